"""Pre-submission checks: everything that can be known wrong before a job waits in a queue.

Each check returns a one-line summary or raises :class:`Refused` with the reason and the fix; the
launcher submits nothing after a refusal. The config itself was validated when it was loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from launch import cluster
from launch.jobfile import read_job_file
from pipeline.config import Config

ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"})


class Refused(Exception):
    """A check failed; the message names the problem and how to fix it."""


def check_data(cfg: Config) -> str:
    """The train split's shards can feed ``world_size`` ranks x ``data.num_workers`` workers."""
    from pipeline.data import PreflightError, preflight

    ranks, workers = cfg.launch.world_size, cfg.data.num_workers
    batch = cfg.train.micro_batch_size
    try:
        r = preflight(cfg.data.path, split=cfg.data.train_split, ranks=ranks, workers=workers, batch_size=batch)
    except PreflightError as e:
        raise Refused(f"data preflight for {ranks} ranks x {max(workers, 1)} workers failed: {e}") from None
    notes = "".join(f"; {n}" for n in r.notes)
    return (
        f"data: {r.path} split {r.split!r}: {r.samples} samples in {r.shards} shards feed {ranks} ranks x "
        f"{max(workers, 1)} workers with {r.batches_per_rank} batches of {batch} per rank per epoch{notes}"
    )


def check_classes(cfg: Config) -> str:
    """The classifier head has an output for every class of the data (and the data has labels)."""
    from pipeline.data import PreflightError, check_classes, read_index

    try:
        index = read_index(cfg.data.path)
        return "classes: " + check_classes(
            index, cfg.model.num_classes, key=cfg.head_key, labels_needed=cfg.labels_needed
        )
    except PreflightError as e:
        raise Refused(f"data preflight: {e}") from None


def check_run_dir(run_dir: Path) -> str:
    """The run dir exists (created if needed) and this user can write files into it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise Refused(
            f"run dir {run_dir} is not writable ({e.strerror or e}); pass --run-dir with a directory you can "
            f"write (checkpoints, logs and job.json go there)"
        ) from None
    return f"run dir: {run_dir} is writable"


def check_resume(cfg: Config, run_dir: Path) -> str:
    """Whether the run dir holds a complete checkpoint to resume (a run dir with only broken ones is
    refused), and that this config keeps its recipe (pipeline/train/resume.py, the ranks' own rule)."""
    from pipeline.artifacts.checkpoints import CheckpointError, check_fits, inspect_run_dir, read_state
    from pipeline.config import config_to_dict
    from pipeline.train.resume import RecipeChanged, plan_resume, require_checkpoint, world_size_change

    try:
        info = inspect_run_dir(run_dir)
        require_checkpoint(info, cfg, run_dir, fix="pass --run-dir of the run to resume")
        if info is None:
            return f"checkpoint: none in the run dir, the job starts fresh{_saved_recipe(cfg, run_dir)}"
        check_fits(info, config_to_dict(cfg.model), cfg.train.zero_stage)
        ws = cfg.launch.world_size  # the ranks' own rule, applied here before anything is queued
        plan = plan_resume(read_state(info.path).get("config"), cfg, saved_world_size=info.world_size,
                           world_size=ws, step=info.step)  # fmt: skip
    except RecipeChanged as e:
        raise Refused(f"run dir {run_dir} holds a run of another recipe: {e}; {RecipeChanged.ALLOW}") from None
    except CheckpointError as e:
        raise Refused(str(e)) from None
    where = f"checkpoint: resumes from step {info.step} ({info.tag}, saved by {info.world_size} ranks)"
    where += "".join(f"; skipped damaged {s}" for s in info.skipped)
    change = world_size_change(info, cfg.launch.world_size)
    where += f"; {change}" if change else ""
    return "".join([where, *(f"\n  resume: {line}" for line in plan.notes + plan.safe)])


def _saved_recipe(cfg: Config, run_dir: Path) -> str:
    """A run dir without a checkpoint may still hold a run (its config.yaml): refuse another recipe there."""
    from pipeline.config import SAVED_CONFIG, ConfigError, read_saved_config
    from pipeline.train.resume import check_recipe

    saved = run_dir / SAVED_CONFIG
    tree = read_saved_config(run_dir)
    if tree is None:
        return ""  # nothing (readable) ran here: a fresh run dir
    try:
        notes = check_recipe(tree, cfg, source=str(saved))
    except ConfigError as e:  # written by another version of the code: say so, refuse nothing on it
        return f"; its {saved.name} cannot be compared with this config ({e})"
    return "".join(f"\n  recipe: {line}" for line in notes)


def check_finetune(cfg: Config) -> str:
    """``finetune.init_from`` names weights that exist and fit ``model.*`` (nothing loaded yet)."""
    if not cfg.finetune.enabled:
        return "finetune: off (pretraining from random init)"
    from pipeline.finetune import FinetuneError, check_source

    try:
        return check_source(cfg)
    except FinetuneError as e:
        raise Refused(str(e)) from None


def check_tracking(cfg: Config, run_dir: Path) -> str:
    """The tracking store answers one authenticated request now, not ~10 s into the job."""
    from pipeline.config import ConfigError
    from pipeline.tracking import TrackingUnavailable, check_tracking

    try:
        return check_tracking(cfg.tracking, run_dir)
    except (ConfigError, TrackingUnavailable) as e:
        raise Refused(str(e)) from None


def check_no_active_job(run_dir: Path) -> str:
    """Refuse a second job on a run dir whose earlier job still runs: both would write its checkpoints."""
    data = read_job_file(run_dir)
    for job in data.get("jobs", []):
        jid = job["job_id"]
        if job.get("executor") == "slurm":
            state = cluster.job_state(jid)
            if state in ACTIVE_STATES:
                raise Refused(
                    f"job {jid} ({state}) still uses {run_dir}; wait for it (`--status {run_dir}`), cancel it "
                    f"(`scancel {jid}`), or pass another --run-dir"
                )
        elif jid.isdigit() and _local_job_running(int(jid)):
            raise Refused(
                f"local job {jid} (pid) still uses {run_dir}; wait for it, stop it (`kill {jid}`), or pass "
                f"another --run-dir"
            )
    from launch import status  # the earlier jobs are all gone: close what they left open

    notes = status.reconcile(run_dir, data, status.job_states(data)) if data else []
    return "run dir: no earlier job of it is active" + "".join(f"; reconciled {n}" for n in notes)


def _local_job_running(pid: int) -> bool:
    """A local job's id is its submitit controller's PID; a reused PID is not our controller."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "submitit.local._local" in cmdline
