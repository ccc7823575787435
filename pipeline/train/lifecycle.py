"""A run's lifecycle around the loop: the ``Run`` (its parts and progress), building it fresh or
resumed, and finishing it (final export, lease, tracker, process group). Saving is saving.py.

A resumed run is rebuilt from the newest complete checkpoint of ``train.run_dir``: weights and
optimizer (DeepSpeed), step and samples seen, the data position (exact resume), every rank's RNG
states and the MLflow run id. A checkpoint written at another world size is converted to
DeepSpeed's universal format first (ZeRO 1-3); see the README for what is exact then.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pipeline.artifacts import checkpoints as stored
from pipeline.artifacts.checkpoints import CheckpointError, ResumeInfo
from pipeline.artifacts.exports import run_export
from pipeline.config import SAVED_CONFIG, Config, config_to_dict, flatten, save_config
from pipeline.data import TrainLoader, ValLoader, build_loader, build_val_loader, check_classes, read_index
from pipeline.logs import StartupPhases, setup_logging, startup_log
from pipeline.model import ViT, forward_macs
from pipeline.tracking import Tracker, experiment_for, open_tracker, run_name_for, run_tags
from pipeline.tracking.datasets import DatasetInput, split_inputs
from pipeline.train import engine as ds
from pipeline.train import lease as run_lease
from pipeline.train import rng
from pipeline.train.batch import BatchPlan, plan_batch
from pipeline.train.dist_env import DistEnv
from pipeline.train.lease import RunDirBusy
from pipeline.train.metrics import device_peak_tflops
from pipeline.train.placement import plan_cpus
from pipeline.train.recipe import Schedule, make_schedule
from pipeline.train.resume import (
    RecipeChanged,
    ResumePlan,
    needs_universal,
    plan_resume,
    require_checkpoint,
    world_size_change,
)
from pipeline.train.stage import Stage

if TYPE_CHECKING:
    from pipeline.train.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """Checkpointed progress, as trainer_state.json holds it (the engine adds ``loader`` and ``config``)."""

    step: int
    samples_seen: int
    skipped_steps: int
    schedule: Schedule
    run_id: str | None = None
    best_top1: float | None = None  # the best evaluation so far (fine-tuning's export_best); absent until then
    unknown: dict[str, Any] = field(default_factory=dict)  # keys this version does not read: written back as found

    _WRITTEN_AT_SAVE = ("loader", "config")

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainerState:
        known = {"step", "samples_seen", "skipped_steps", "schedule", "run_id", "best_top1", *cls._WRITTEN_AT_SAVE}
        return cls(
            step=saved["step"], samples_seen=saved["samples_seen"], skipped_steps=saved["skipped_steps"],
            schedule=Schedule(**saved["schedule"]), run_id=saved.get("run_id"), best_top1=saved.get("best_top1"),
            unknown={k: v for k, v in saved.items() if k not in known},
        )  # fmt: skip

    def to_dict(self, *, loader: dict, config: dict) -> dict[str, Any]:
        out = {**self.unknown, "step": self.step, "samples_seen": self.samples_seen}
        out.update(skipped_steps=self.skipped_steps, schedule=self.schedule.to_dict(), run_id=self.run_id)
        if self.best_top1 is not None:
            out["best_top1"] = self.best_top1
        return {**out, "loader": loader, "config": config}


@dataclass
class Run:
    cfg: Config
    env: DistEnv
    device: ds.Device
    dtype: torch.dtype
    plan: BatchPlan
    run_dir: Path
    stage: Stage
    engine: Engine
    train_loader: TrainLoader
    val_loader: ValLoader | None
    tracker: Tracker
    state: TrainerState
    resumed: bool
    macs: int
    peak_tflops: float | None

    @property
    def schedule(self) -> Schedule:
        return self.state.schedule

    @property
    def total_steps(self) -> int:
        left = max(0, self.schedule.total_samples - self.state.samples_seen)
        return self.state.step + -(-left // self.plan.global_batch_size)


def _device(choice: str) -> ds.Device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
        return "cuda"
    return "cpu"


def _dtype(precision: str, device: ds.Device) -> torch.dtype:
    if precision == "fp16" and device == "cpu":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_run(cfg: Config, env: DistEnv, overrides: list[str], stage: Stage) -> Run:
    phases = StartupPhases()  # each phase says its time as it ends (the job log's first lines)
    device, dtype = _environment(cfg, env)
    phases.done(
        "environment", f"{env.world_size} rank(s) on {env.num_nodes} node(s), {device}, torch {torch.__version__}"
    )
    # Before any weights exist: a label past the head would fail at step 1 (a device-side assert on a GPU).
    index = read_index(cfg.data.path)
    log.info("data: %s", check_classes(index, cfg.model.num_classes, key=cfg.head_key, labels_needed=cfg.labels_needed))
    phases.done("data index", cfg.data.path)
    run_dir = Path(cfg.train.run_dir).absolute()
    _hold_run_dir(run_dir, env)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    info = _resume_info(cfg, env, run_dir)
    resume = _plan_resume(cfg, env, info)
    plan = plan_batch(cfg.train, env.world_size)
    phases.lap("resume")  # the checkpoint scan; said with the load below
    rng.seed_all(cfg.train.seed)  # identical initial weights on every rank
    model = _build_model(cfg, stage, fresh=info is None)
    groups = stage.param_groups(model)
    phases.done("model", f"{sum(p.numel() for p in model.parameters()):,} parameters")
    universal = info is not None and needs_universal(info, env.world_size)
    load_tag = _prepare_universal(info, env) if universal else (info.tag if info else None)
    engine = ds.initialize(
        model,
        groups,
        ds.ds_config(train=cfg.train, optim=cfg.optim, plan=plan, device=device, load_universal=universal),
        device,
        compile=cfg.train.compile,
    )
    phases.done("engine", f"DeepSpeed ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}")
    if info is not None:
        ds.load(engine, stored.checkpoints_dir(run_dir), load_tag)
        if universal:
            _verify_universal(engine, info, env, cfg.train.precision)
        saved = stored.read_state(info.path)
        state = TrainerState.from_dict(saved)
        rng.restore(info, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed, step=state.step)
        state.schedule = _resumed_schedule(state, resume, plan)  # the next checkpoint carries the re-stretched curve
        log.info("resumed from %s (step %d, %d samples seen)", info.path, state.step, state.samples_seen)
    else:
        schedule = make_schedule(cfg.optim, steps=cfg.train.steps, global_batch_size=plan.global_batch_size)
        state = TrainerState(step=0, samples_seen=0, skipped_steps=0, schedule=schedule)
        rng.seed_all(cfg.train.seed + 1000 * env.rank)  # per-rank streams (dropout and mixing are keyed per step)
    phases.done("resume", f"from step {state.step}" if info is not None else "no checkpoint: a fresh run")
    train_loader, val_loader = _loaders(cfg, env, plan, device)
    if info is not None:
        train_loader.load_state_dict(_loader_state(info, env, saved))
    phases.done("data loaders", f"{cfg.data.num_workers} worker(s) per rank")
    tracker = _tracker(cfg, env, run_dir, state, overrides, info, stage.tags())
    state.run_id = tracker.run_id
    if env.rank == 0:
        save_config(cfg, run_dir / SAVED_CONFIG)
        tracker.log_artifact(run_dir / SAVED_CONFIG)
        tracker.log_datasets(_dataset_inputs(cfg, evaluates=val_loader is not None))
    phases.done("tracker", f"MLflow run {tracker.run_id}" if tracker.run_id else "tracking off")
    startup_log.info("start-up: ready in %.1f s, run dir %s", phases.total(), run_dir)
    return Run(
        cfg=cfg, env=env, device=device, dtype=dtype, plan=plan, run_dir=run_dir, stage=stage, engine=engine,
        train_loader=train_loader, val_loader=val_loader, tracker=tracker, state=state, resumed=info is not None,
        macs=forward_macs(model), peak_tflops=device_peak_tflops(cfg.train.peak_tflops, device),
    )  # fmt: skip


def _environment(cfg: Config, env: DistEnv) -> tuple[ds.Device, torch.dtype]:
    """This rank's device, threads, logging and process group."""
    device = _device(cfg.train.device)
    dtype = _dtype(cfg.train.precision, device)
    env.export()
    setup_logging(env.rank)
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    else:
        # Every rank says it (not only rank 0): a wrong split shows on the rank that has it.
        cpus = plan_cpus(env, num_workers=cfg.data.num_workers, cpu_threads=cfg.train.cpu_threads)
        torch.set_num_threads(cpus.torch_threads)
        print(cpus.describe(env), flush=True)
    ds.init_distributed(device)
    return device, dtype


def _hold_run_dir(run_dir: Path, env: DistEnv) -> None:
    """Collective: rank 0 takes (or adopts) the run dir's lease; all ranks refuse together if another
    live job holds it (see lease.py), before anything in the run dir is read or written."""
    refusal: list[str | None] = [None]
    if env.rank == 0:
        try:
            run_lease.hold_for_job(run_dir)
        except RunDirBusy as e:
            refusal = [str(e)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise RunDirBusy(refusal[0])


def _resume_info(cfg: Config, env: DistEnv, run_dir: Path) -> ResumeInfo | None:
    """The checkpoint to resume from, after checking it fits this config (before any step)."""
    info = resume_candidate(run_dir, env)
    require_checkpoint(info, cfg, run_dir)
    if info is None:
        return None
    stored.check_fits(info, config_to_dict(cfg.model), cfg.train.zero_stage)
    change = world_size_change(info, env.world_size)
    if change:
        log.warning("%s", change)
    return info


def _plan_resume(cfg: Config, env: DistEnv, info: ResumeInfo | None) -> ResumePlan | None:
    """Honour or refuse each key that differs from the checkpoint's config (the launcher's rule too).

    Keeps the checkpoint's global batch: ``cfg.train.global_batch_size`` is pinned to it, so the
    accumulation is re-derived for this world size (and the saved config says so from now on).
    """
    if info is None:
        return None
    saved = stored.read_state(info.path).get("config")
    try:
        resume = plan_resume(saved, cfg, saved_world_size=info.world_size, world_size=env.world_size, step=info.step)
    except RecipeChanged as e:
        raise RecipeChanged(f"{e}; {RecipeChanged.ALLOW}") from None
    if env.rank == 0:
        for line in resume.safe:
            log.info("resume: %s", line)
        for line in resume.notes:
            log.warning("resume: %s", line)
    cfg.train.global_batch_size = resume.global_batch_size
    return resume


def _resumed_schedule(state: TrainerState, resume: ResumePlan | None, plan: BatchPlan) -> Schedule:
    """The checkpoint's schedule; re-stretched to the new end when train.steps changed; with this
    config's learning rates when the recipe changes on purpose (checkpoint.allow_recipe_change)."""
    schedule = state.schedule
    if resume is not None and resume.optim is not None:
        o = resume.optim
        schedule = replace(schedule, peak_lr=o.lr, min_lr=o.min_lr, kind=o.schedule)
    if resume is None or resume.steps[0] == resume.steps[1]:
        return schedule
    total = state.samples_seen + max(0, resume.steps[1] - state.step) * plan.global_batch_size
    return schedule.stretch(state.samples_seen, total)


def resume_candidate(run_dir: Path, env: DistEnv) -> ResumeInfo | None:
    """Collective: the newest checkpoint whose every file matches its commit, agreed by all ranks.

    Each rank checksums its own share of the files in parallel; the ranks unite their findings
    before choosing, so all of them load the same checkpoint (or all refuse).
    """
    return stored.inspect_run_dir(
        run_dir, rank=env.rank, world_size=env.world_size, agree=ds.union_across_ranks, max_bytes=None
    )


def _prepare_universal(info: ResumeInfo, env: DistEnv) -> str:
    out = info.path.with_name(info.tag + "_universal")
    if env.rank == 0:
        out = ds.to_universal(info.path)
    dist.barrier()
    return out.name


def _verify_universal(engine: Engine, info: ResumeInfo, env: DistEnv, precision: str) -> None:
    """Check the converted load reproduced the saved weights before training on them.

    The universal conversion is the one place where shards are re-cut; a mistake there would
    train on scrambled weights without any error, so compare against the offline consolidation.
    """
    live = ds.gathered_state_dict(engine)  # collective
    worst = torch.zeros((), dtype=torch.float64)
    if env.rank == 0:
        saved = ds.consolidated_state_dict(info.path, info.zero_stage)
        for name, w in live.items():
            ref = saved[name] if precision == "fp32" else saved[name].to(torch.bfloat16).float()
            worst = torch.maximum(worst, (w - ref).abs().max().double())
    dist.broadcast(worst, src=0)
    tol = 1e-6 if precision == "fp32" else 1e-2
    log.info("universal resume verified: max |w - saved| = %.3g over the model's tensors", worst.item())
    if worst.item() > tol:
        raise CheckpointError(
            f"resuming {info.path} at world size {env.world_size} (saved at {info.world_size}) changed the weights "
            f"by up to {worst.item():.3g} (> {tol}); resume with {info.world_size} ranks, or report this DeepSpeed "
            f"universal-checkpoint problem"
        )


def _build_model(cfg: Config, stage: Stage, *, fresh: bool) -> ViT:
    """The stage's model, initialised by the stage (a fine-tune's fresh start: the pretrained backbone)."""
    model = stage.build_model()
    stage.init_model(model, fresh=fresh)
    model.set_recompute(cfg.model.recompute_mode, every=cfg.model.recompute_every)
    return model


def _loaders(cfg: Config, env: DistEnv, plan: BatchPlan, device: ds.Device) -> tuple[TrainLoader, ValLoader | None]:
    size = cfg.model.image_size
    image_size = tuple(size) if isinstance(size, tuple) else (size, size)
    # On a GPU the uint8 batch crosses and becomes float there (a quarter of the bytes; no float pass on the CPU)
    on = "cuda" if device == "cuda" else None
    train = build_loader(
        cfg.data, rank=env.rank, world_size=env.world_size, batch_size=plan.micro_batch_size,
        image_size=image_size, seed=cfg.train.seed, pin_memory=device == "cuda", normalise_on=on,
    )  # fmt: skip
    val = build_val_loader(
        cfg.data, rank=env.rank, world_size=env.world_size,
        batch_size=plan.micro_batch_size, image_size=image_size, normalise_on=on,  # data.val_batch_size wins when set
    )  # fmt: skip
    return train, val


def _loader_state(info: ResumeInfo, env: DistEnv, saved: dict) -> dict:
    """This rank's own loader state (its skip counters), else rank 0's (the position is the same on all ranks).

    Only rank 0 writes trainer_state.json; without its own file, rank r would restart its counts of
    skipped samples from 0 and data.max_skip_frac would be judged on part of the run.
    """
    path = stored.loader_file(info.path, env.rank)
    if info.world_size == env.world_size and path.exists():
        return json.loads(path.read_text())
    return saved["loader"]


def _tracker(
    cfg: Config,
    env: DistEnv,
    run_dir: Path,
    state: TrainerState,
    overrides: list[str],
    info: ResumeInfo | None,
    stage_tags: dict[str, str],
) -> Tracker:
    role = "writer" if env.rank == 0 else ("node" if env.local_rank == 0 else "none")
    first_role = role if role == "writer" else "none"
    tags = run_tags(cfg, world_size=env.world_size, num_nodes=env.num_nodes)
    if info is not None:
        tags["resumed_from_step"] = str(info.step)
    tags.update(stage_tags)
    kwargs = dict(
        experiment=experiment_for(cfg),
        run_name=run_name_for(cfg, overrides),
        params=flatten(cfg),
        tags=tags,
        num_nodes=env.num_nodes,
    )
    # The writer creates (or resumes) the run first; the other nodes' system-metrics trackers then
    # attach to that run id instead of waiting for tracking.json on a shared filesystem.
    tracker = open_tracker(cfg.tracking, run_dir=run_dir, run_id=state.run_id, role=first_role, **kwargs)
    run_id = [tracker.run_id if env.rank == 0 else None]
    dist.broadcast_object_list(run_id, src=0)
    if role == "node":
        tracker = open_tracker(cfg.tracking, run_dir=run_dir, run_id=run_id[0], role="node", **kwargs)
    return tracker


def _dataset_inputs(cfg: Config, *, evaluates: bool) -> list[DatasetInput]:
    """The shard index as the run's MLflow dataset inputs: its train split, and its val split when the
    run evaluates; each named after the data set, its digest the split's fingerprint."""
    index = read_index(cfg.data.path)
    where = index.location.resolve()
    splits = {name: (index.fingerprint(name), info.samples) for name, info in index.splits.items()}
    return split_inputs(
        name=where.stem if where.is_file() else where.name, source=str(where), splits=splits,
        train_split=cfg.data.train_split, val_split=cfg.data.val_split if evaluates else None,
        num_classes=index.num_classes,
    )  # fmt: skip


def finish_run(r: Run, status: str, *, within_s: float | None = None) -> None:
    """Export the final weights (completed runs) and close the tracker; always leaves the group.

    ``within_s``: SIGKILL is that near (a stop on SIGTERM): close the MLflow run first, no plot;
    what the tracker cannot deliver in time stays in its buffer for the next start to replay."""
    try:
        if status == "FINISHED" and r.cfg.checkpoint.export_final:
            from pipeline.train.export import export_checkpoint

            if r.env.rank == 0:
                out = export_checkpoint(stored.inspect_run_dir(r.run_dir), r.run_dir / "export", r.tracker.run_id)
                r.tracker.log_artifact(out / "model.json", "export")
            dist.barrier()
        if status == "FINISHED" and r.env.rank == 0:
            _log_model(r)
    finally:
        run_lease.end_held(status)  # kept when KILLED: a requeued job adopts it
        if within_s is None:
            r.tracker.close(status)
        else:
            r.tracker.close(status, timeout_s=max(0.5, within_s), plot=False)
        if dist.is_initialized():
            dist.destroy_process_group()


def _log_model(r: Run) -> None:
    """The run's model into MLflow (``runs:/<id>/model``; registered under tracking.register_as):
    a fine-tune's best evaluation (export/best) when it kept one, else the final export. Once, at
    the end, rather than at every new best: one upload of the weights per run."""
    source = run_export(r.run_dir)
    name = r.cfg.tracking.register_as
    if source is None:
        if name:
            log.warning("tracking.register_as=%s: nothing registered, the run has no export", name)
        return
    r.tracker.log_model(source, register_as=name, best_top1=r.state.best_top1)
