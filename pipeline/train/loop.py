"""The training loop, top to bottom: set up, resume, step, log, evaluate, checkpoint, finish.

Every rank runs this same code (STYLE: one loop you read top to bottom). The collective calls
(DeepSpeed steps, saves, all-reduces) are made by all ranks in the same order.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from pipeline import metric_names as mn
from pipeline.artifacts import checkpoints as ckpt
from pipeline.config import Config
from pipeline.data import DataError
from pipeline.train import engine as ds
from pipeline.train import lease as run_lease
from pipeline.train import preemption, space
from pipeline.train.dist_env import detect
from pipeline.train.lifecycle import Run, build_run, finish_run, resume_candidate
from pipeline.train.metrics import Window, mfu
from pipeline.train.metrics_log import MetricsLog
from pipeline.train.recipe import set_lr
from pipeline.train.saving import BackgroundSaves, SaveDone, save_checkpoint
from pipeline.train.stage import Stage, pretraining

log = logging.getLogger(__name__)

# Test hook: optimizer step numbers (1-based, as logged) whose loss is made NaN on rank 0.
NONFINITE_ENV = "PIPELINE_INJECT_NONFINITE"
_SEED_MASK, _TAG_FORWARD = (1 << 63) - 1, 0xD409
# Test hook, "RANK@STEP": that rank raises the loader's DataError before that step (1-based), as a
# damaged shard only it reads would; the other ranks then lose their peer in the next collective.
DATA_ERROR_ENV = "PIPELINE_INJECT_DATA_ERROR"


class NonFiniteError(RuntimeError):
    """Training keeps producing non-finite losses/gradients even after a rollback."""


@dataclass
class TrainResult:
    status: Literal["completed", "preempted", "terminated"]
    step: int
    samples_seen: int
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    undelivered: int = 0  # tracking records that never reached the store (rank 0; kept for replay)


@dataclass
class Progress:
    """Loop counters that are not part of the checkpointed state."""

    local_log: MetricsLog  # <run_dir>/metrics.jsonl (written by rank 0)
    consecutive_skips: int = 0
    first_skip_step: int = 0
    rollbacks: int = 0
    last_saved_step: int = -1
    last_save_s: float | None = None  # this attempt's last save, measured (the SIGTERM budget)
    window: Window = field(default_factory=Window)
    last_metrics: dict[str, float] = field(default_factory=dict)
    ckpt_bytes: int = 0  # one checkpoint's size: the last one written, or an estimate before it
    background: BackgroundSaves = field(default_factory=BackgroundSaves)  # checkpoint.async_save


def run(
    cfg: Config,
    *,
    stage: Stage | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    kill_wait_s: float | None = None,
    on_terminated: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Train according to ``cfg`` on this rank; resume from ``cfg.train.run_dir`` if it has checkpoints.

    ``stage``: what is trained (``pipeline.stages.stage_for(cfg)``); None: classification pretraining.

    ``kill_wait_s``: seconds between SIGTERM and SIGKILL (SLURM's KillWait, passed by the launcher);
    None: SLURM's default, ``preemption.DEFAULT_KILL_WAIT_S``. ``on_terminated``: called with the
    result after a stop on SIGTERM, before the MLflow run is closed (the launcher marks its attempt
    there: SIGKILL may come while the tracker flushes).
    """
    env = detect()
    try:
        r = build_run(cfg, env, list(overrides), stage or pretraining(cfg))
    except BaseException:
        run_lease.end_held("FAILED")  # a job that never started must not keep the run dir
        raise
    preemption.install()
    status: Literal["FINISHED", "FAILED", "KILLED"] = "FAILED"
    kill_wait = preemption.DEFAULT_KILL_WAIT_S if kill_wait_s is None else kill_wait_s
    try:
        result = _train(r, kill_wait)
        status = "FINISHED" if result.status == "completed" else "KILLED"
        if result.status == "terminated" and on_terminated is not None:
            on_terminated(result)
    finally:
        preemption.uninstall()
        left = kill_wait - preemption.seconds_since_terminate() - 0.5 if preemption.terminate_requested() else None
        finish_run(r, status, within_s=left)
    result.undelivered = r.tracker.undelivered
    return result


def _train(r: Run, kill_wait_s: float) -> TrainResult:
    p = Progress(
        last_saved_step=r.state.step if r.resumed else -1,
        ckpt_bytes=_checkpoint_bytes(r),
        local_log=MetricsLog(r.run_dir, enabled=r.env.rank == 0),
    )
    _warn_space(r, p)
    _supersede(r, p, to_step=r.state.step, from_step=None)  # steps a killed attempt ran past its checkpoint
    data = iter(r.train_loader)
    total = r.schedule.total_samples
    log.info(
        "training %s: step %d, %d/%d samples, global batch %d = %d x %d x %d ranks",
        r.cfg.name, r.state.step, r.state.samples_seen, total, r.plan.global_batch_size,
        r.plan.micro_batch_size, r.plan.grad_accum, r.env.world_size,
    )  # fmt: skip
    if r.state.samples_seen >= total:
        log.info("this run is already complete (%d samples); nothing to train", total)
    while r.state.samples_seen < total:
        set_lr(ds.param_groups_of(r.engine), r.schedule.lr(r.state.samples_seen))
        loss, skipped, (preempt, terminate), wait = _step(r, data)
        r.state.step += 1
        r.state.samples_seen += r.plan.global_batch_size
        p.window.add(images=r.plan.global_batch_size, data_wait=wait, loss=None if skipped else loss)
        if skipped and _on_skipped(r, p):
            p.window.reset()
            continue  # rolled back: the step counter is the checkpoint's again
        if not skipped:
            p.consecutive_skips = 0
        if r.state.step % r.cfg.train.log_every == 0:
            _log_step(r, p)
        if r.cfg.train.eval_every and r.state.step % r.cfg.train.eval_every == 0:
            _evaluate(r, p)
        if preempt:
            _save(r, p)
            log.warning("saved step %d on the pre-timeout signal; stopping for requeue", r.state.step)
            return _result(r, p, "preempted")
        if terminate:
            _stop_on_terminate(r, p, kill_wait_s)
            return _result(r, p, "terminated")
        every = r.cfg.checkpoint.every_steps
        if every and r.state.step % every == 0:
            _save(r, p, background=r.cfg.checkpoint.async_save)
    if not r.cfg.train.eval_every or r.state.step % r.cfg.train.eval_every:
        _evaluate(r, p)
    if p.last_saved_step != r.state.step:
        _save(r, p)
    _wait_for_background_save(r, p)  # the export and the launcher read the last checkpoint
    return _result(r, p, "completed")


def _result(r: Run, p: Progress, status: Literal["completed", "preempted", "terminated"]) -> TrainResult:
    return TrainResult(status, r.state.step, r.state.samples_seen, r.tracker.run_id, dict(p.last_metrics))


def _step(r: Run, data: Any) -> tuple[float, bool, tuple[bool, bool], float]:
    """One optimizer step (grad_accum micro batches). Returns loss, skipped, (USR2, TERM), data wait."""
    engine, wait = r.engine, 0.0
    loss_sum = torch.zeros((), dtype=torch.float64)
    inject = _inject_nonfinite(r)
    _inject_data_error(r)
    for micro in range(r.plan.grad_accum):
        t0 = time.perf_counter()
        images, labels = next(data)
        wait += time.perf_counter() - t0
        images = images.to(r.device, r.dtype, non_blocking=True)
        labels = labels.to(r.device, non_blocking=True)
        _seed_forward(r, micro)  # after next(data): a new DataLoader iterator draws its seed from torch
        loss = r.stage.batch_loss(engine, images, labels, rank=r.env.rank, step=r.state.step, micro=micro)
        if inject:
            loss = loss * float("nan")
        engine.backward(loss)
        guarded = ds.guard_nonfinite_grads(engine, r.cfg.optim.grad_clip)  # plain stage 0 only
        engine.step()
        loss_sum += loss.detach().double().cpu()
    # One small all-reduce per step: loss, skip flag, USR2 and TERM flags (the ranks agree on all).
    applied = ds.step_applied(engine) and not guarded
    flags = torch.tensor(
        [float(loss_sum) if torch.isfinite(loss_sum) else 0.0, float(not torch.isfinite(loss_sum) or not applied),
         float(preemption.requested()), float(preemption.terminate_requested())],
        dtype=torch.float64,
    )  # fmt: skip
    dist.all_reduce(flags)
    loss = float(flags[0]) / (r.env.world_size * r.plan.grad_accum)
    return loss, bool(flags[1] > 0), (bool(flags[2] > 0), bool(flags[3] > 0)), wait


def _seed_forward(r: Run, micro: int) -> None:
    """Seed torch's generators (CPU and every GPU) from (seed, rank, step, micro-step).

    Dropout and drop path draw from them; keyed this way the draws of a step do not depend on what
    ran before it (a resume, a DataLoader iterator's seed draw), so resumed runs stay bit-identical.
    Gradient checkpointing replays the same draws: torch.utils.checkpoint saves and restores the RNG
    state around the recompute (preserve_rng_state=True, its default).
    """
    key = [r.cfg.train.seed & _SEED_MASK, r.env.rank, r.state.step, micro, _TAG_FORWARD]
    torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def _inject_nonfinite(r: Run) -> bool:
    raw = os.environ.get(NONFINITE_ENV, "")
    steps = {int(s) for s in raw.split(",") if s.strip().isdigit()}
    return r.env.rank == 0 and (r.state.step + 1) in steps


def _inject_data_error(r: Run) -> None:
    rank, _, step = os.environ.get(DATA_ERROR_ENV, "").partition("@")
    if rank.isdigit() and step.isdigit() and int(rank) == r.env.rank and r.state.step + 1 == int(step):
        raise DataError(
            f"data: 40 of 48 samples read on rank {r.env.rank} were skipped (83.33%), above data.max_skip_frac "
            f"(injected by {DATA_ERROR_ENV} at step {step}); worst shards: train-000003.tar (40)"
        )


def _on_skipped(r: Run, p: Progress) -> bool:
    """Count a skipped step; after K in a row, roll back once (True), then stop with the step range."""
    r.state.skipped_steps += 1
    if p.consecutive_skips == 0:
        p.first_skip_step = r.state.step
    p.consecutive_skips += 1
    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", r.state.step, p.consecutive_skips)
    if p.consecutive_skips < r.cfg.train.max_nonfinite_steps:
        return False
    span = f"steps {p.first_skip_step}-{r.state.step}"
    if p.rollbacks:
        raise NonFiniteError(
            f"non-finite loss/gradients again at {span} after rolling back once; lower optim.lr, raise "
            f"optim.warmup_steps, or switch train.precision (now {r.cfg.train.precision})"
        )
    _wait_for_background_save(r, p)  # roll back to the newest checkpoint, as with synchronous saves
    info = resume_candidate(r.run_dir, r.env)  # collective: an intact checkpoint, agreed by all ranks
    if info is None:
        raise NonFiniteError(f"non-finite loss/gradients at {span} and no checkpoint to roll back to")
    log.warning("%s non-finite: rolling back to %s and skipping that data window", span, info.tag)
    ds.load(r.engine, ckpt.checkpoints_dir(r.run_dir), info.tag)
    saved = ckpt.read_state(info.path)
    r.state.step, r.state.samples_seen = saved["step"], saved["samples_seen"]
    r.state.skipped_steps = saved["skipped_steps"] + p.consecutive_skips  # the skipped steps still happened
    _supersede(r, p, to_step=saved["step"], from_step=p.first_skip_step + p.consecutive_skips - 1)
    p.rollbacks += 1
    p.consecutive_skips = 0
    return True


def _log_step(r: Run, p: Progress) -> None:
    w = p.window.summary()
    counters = _sum_counters(r.train_loader.counters())
    lr = r.schedule.lr(r.state.samples_seen)
    per_device = w["img_per_s"] / r.env.world_size
    metrics = {
        mn.TRAIN_LOSS: w["loss"],
        mn.TRAIN_LR: lr,
        mn.TRAIN_IMG_PER_S: w["img_per_s"],
        mn.TRAIN_SAMPLES_SEEN: float(r.state.samples_seen),
        mn.TRAIN_SKIPPED_STEPS: float(r.state.skipped_steps),
        mn.TRAIN_EPOCH: float(r.train_loader.epoch),
        mn.DATA_WAIT_FRAC: w["wait_frac"],
        **{k: float(v) for k, v in counters.items()},
    }
    norm = ds.grad_norm(r.engine)
    if norm is not None:
        metrics[mn.TRAIN_GRAD_NORM] = norm
    util = mfu(per_device, r.macs, r.peak_tflops)
    if util is not None:
        metrics[mn.TRAIN_MFU] = util
    _record(r, p, metrics)
    remaining = (r.schedule.total_samples - r.state.samples_seen) / max(w["img_per_s"], 1e-9)
    log.info(
        "step %d/%d | loss %.4f | lr %.2e | %.1f img/s | data %.0f%% | eta %s",
        r.state.step, r.total_steps, w["loss"], lr, w["img_per_s"], 100 * w["wait_frac"], _hms(remaining),
    )  # fmt: skip
    p.window.reset()


def _record(r: Run, p: Progress, metrics: dict[str, float]) -> None:
    """To MLflow, and to <run_dir>/metrics.jsonl: a plain record that needs no server to read
    (train/metrics_log.py says why these are two files)."""
    step = r.state.step
    r.tracker.log_metrics(metrics, step=step)
    p.last_metrics.update(metrics)
    p.local_log.record(step, metrics)


def _supersede(r: Run, p: Progress, *, to_step: int, from_step: int | None) -> None:
    """Training goes on from the checkpoint of ``to_step`` (a rollback, or a resume after a kill): the
    lines of later steps leave metrics.jsonl (their re-run replaces them), and the tracker marks the
    superseded MLflow points (MLflow cannot delete them)."""
    p.local_log.supersede(to_step)
    r.tracker.rolled_back(to_step, from_step)


def _sum_counters(counters: dict[str, int]) -> dict[str, int]:
    """Data counters summed over ranks (each rank reads its own shards)."""
    keys = sorted(counters)
    t = torch.tensor([counters[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: int(v) for k, v in zip(keys, t.tolist(), strict=True)}


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@torch.no_grad()
def _evaluate(r: Run, p: Progress) -> None:
    """The stage's metrics over the val split (collective), recorded; then the stage's follow-up."""
    if r.val_loader is None:
        return
    r.engine.eval()
    try:
        metrics = r.stage.evaluate(r)
    finally:
        r.engine.train()
    _record(r, p, metrics)
    r.stage.after_eval(r, metrics)


def _stop_on_terminate(r: Run, p: Progress, kill_wait_s: float) -> None:
    """SIGTERM: save if the checkpoint ends before SLURM's SIGKILL, else stop without one.

    The ranks decide together: the longest time since a rank saw TERM and the slowest rank's last
    save (a max all-reduce), so every rank reaches the same verdict and the collective save either
    runs on all ranks or on none.
    """
    _wait_for_background_save(r, p)  # it may be this very step's; the time it takes counts as elapsed
    last = -1.0 if p.last_save_s is None else p.last_save_s
    worst = torch.tensor([preemption.seconds_since_terminate(), last], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    elapsed, last_save = float(worst[0]), (float(worst[1]) if worst[1] >= 0 else None)
    decision = preemption.save_fits(kill_wait_s=kill_wait_s, elapsed_s=elapsed, last_save_s=last_save)
    step = r.state.step
    if p.last_saved_step == step:
        log.warning("stopping on SIGTERM at step %d, already saved", step)
    elif decision.save:
        _save(r, p)
        log.warning("saved step %d on SIGTERM (%s); stopping", step, decision.reason)
    else:
        log.warning("stopping on SIGTERM at step %d without a checkpoint: %s", step, decision.reason)


def _save(r: Run, p: Progress, *, background: bool = False) -> None:
    """Save this step: synchronously, or (``background``) snapshot now and commit in the background.

    Either way a save still in flight is committed first: one at a time, in step order.
    """
    _wait_for_background_save(r, p)
    _warn_space(r, p)
    t0 = time.perf_counter()
    with _out_of_space_named(r, p, r.state.step):
        if background:
            p.background.start(r)
        else:
            _saved(r, p, SaveDone(save_checkpoint(r), time.perf_counter() - t0))
    p.last_saved_step = r.state.step


def _wait_for_background_save(r: Run, p: Progress) -> None:
    if p.background.in_flight:
        with _out_of_space_named(r, p, p.last_saved_step):
            _saved(r, p, p.background.wait())


def _saved(r: Run, p: Progress, done: SaveDone | None) -> None:
    """Bookkeeping of a committed save: its full duration (the SIGTERM budget) and size."""
    if done is not None:
        p.last_save_s = done.seconds
        p.ckpt_bytes = space.tree_bytes(done.tag_dir) if r.env.rank == 0 else p.ckpt_bytes


@contextmanager
def _out_of_space_named(r: Run, p: Progress, step: int) -> Iterator[None]:
    """A full disk while saving ``step`` becomes an error that says what to free or change."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        ckpt_dir = ckpt.checkpoints_dir(r.run_dir)
        if space.is_out_of_space(e, ckpt_dir, p.ckpt_bytes):
            tag_dir = ckpt_dir / ckpt.tag_for(step)
            raise space.out_of_space_error(tag_dir, step, r.cfg.checkpoint.keep_last, e) from e
        raise


def _checkpoint_bytes(r: Run) -> int:
    """The resumed checkpoint's size, or an estimate from the model before the first save."""
    info = ckpt.inspect_run_dir(r.run_dir) if r.env.rank == 0 and r.resumed else None
    if info is not None:
        return space.tree_bytes(info.path)
    params = sum(getattr(w, "ds_numel", w.numel()) for w in r.engine.module.parameters())  # full sizes under ZeRO-3
    return space.estimate_bytes(params, torch.finfo(r.dtype).bits // 8)


def _warn_space(r: Run, p: Progress) -> None:
    """Rank 0 warns when keep_last + 1 checkpoints would not fit (at start-up and before each save)."""
    if r.env.rank == 0:
        ckpt_dir = ckpt.checkpoints_dir(r.run_dir)
        keep = r.cfg.checkpoint.keep_last
        warning = space.space_warning(ckpt_dir, one_bytes=p.ckpt_bytes, keep_last=keep, step=r.state.step)
        if warning:
            log.warning("%s", warning)
