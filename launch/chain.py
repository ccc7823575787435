"""Chained stages: ``launch/submit.py --after RUN_DIR|JOB_ID`` starts a job only once another completed.

On SLURM the job is queued at once with ``--dependency=afterok:<id>`` and ``--kill-on-invalid-dep=yes``:
it starts when the predecessor has COMPLETED (a predecessor requeued on USR2 keeps its job id, so the
dependency waits for its final end), and SLURM cancels it when the predecessor ends any other way,
instead of leaving it pending forever. The local executor has no queue: the submitter itself waits for
the predecessor, then submits, or submits nothing and says why. A sweep's array takes the same
dependency (:func:`sbatch_dependency` for every member). The dependency is recorded in the
dependent's job.json (``jobs[].after``) so that ``--status`` can say what the job waits for, or why
it never ran (:func:`status_lines`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from launch import checks, cluster
from launch.jobfile import JOB_FILE, describe_failure, first_failure, read_job_file, update_job_file
from pipeline.config import Config, read_saved_config
from pipeline.proc import pid_alive

AFTER = "afterok"
POLL_S = 5.0


@dataclass(frozen=True)
class Predecessor:
    """The job ``--after`` names: its id, where it runs, its run dir (when known) and its state now."""

    job_id: str
    executor: str  # "slurm" | "local"
    run_dir: Path | None
    state: str

    def describe(self) -> str:
        """``job 42 (run dir runs/smoke)``"""
        return f"job {self.job_id}" + (f" (run dir {self.run_dir})" if self.run_dir else "")

    def record(self) -> dict[str, str]:
        """The dependent's ``jobs[].after`` entry in job.json."""
        out = {"job_id": self.job_id, "executor": self.executor, "type": AFTER}
        return {**out, "run_dir": str(self.run_dir)} if self.run_dir else out

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"


def resolve(after: str, kind: str) -> Predecessor:
    """``--after`` (a run dir launched by launch/submit.py, or a SLURM job id) for a job of executor ``kind``;
    raises checks.Refused before anything is queued when it cannot be waited for."""
    path = Path(after)
    if path.is_dir():
        pred = _from_run_dir(path.absolute())
    elif after.isdigit():
        if kind == "local":
            raise checks.Refused(
                f"--after {after}: the local executor follows a job through its run dir, not a job id; "
                f"pass --after RUN_DIR of that job (or submit where SLURM answers)"
            )
        pred = Predecessor(after, "slurm", None, cluster.job_state(after))
        if pred.state == "UNKNOWN":
            raise checks.Refused(
                f"--after {after}: SLURM knows no job {after} (neither squeue nor sacct); check the id "
                f"(`sacct -j {after}`) or pass the predecessor's run dir"
            )
    else:
        raise checks.Refused(f"--after {after!r} is neither a run dir nor a SLURM job id; pass one of them")
    if kind == "slurm" and pred.executor != "slurm":
        raise checks.Refused(
            f"--after {after}: {pred.describe()} runs on the local executor; a SLURM job cannot wait for it. "
            f"Submit this job with --local (it then waits here), or after that job ends"
        )
    if _final(pred.state) and not pred.completed:
        raise checks.Refused(
            f"--after {after}: {pred.describe()} already ended {pred.state}{_why(pred)}; this job would never "
            f"start. Rerun the predecessor first, or drop --after"
        )
    return pred


def _from_run_dir(run_dir: Path) -> Predecessor:
    data = read_job_file(run_dir)
    if not data.get("jobs"):
        raise checks.Refused(
            f"--after {run_dir}: no {JOB_FILE} with a job in it, so it is not a run dir launched by "
            f"launch/submit.py; pass the run dir of a submitted job, or its SLURM job id"
        )
    newest = data["jobs"][-1]  # requeues keep the SLURM job id: the newest job is the one to wait for
    return _job_of(run_dir, data, str(newest["job_id"]))


def _job_of(run_dir: Path, data: dict[str, Any], job_id: str) -> Predecessor:
    """Job ``job_id`` of ``run_dir`` (its job.json ``data``) with its state now."""
    from launch import status  # reads SLURM's or the local controller's view of every job

    job = next(j for j in data["jobs"] if str(j["job_id"]) == job_id)
    state = status.job_states({"jobs": [job], "attempts": data.get("attempts", [])})[job_id]
    return Predecessor(job_id, str(job.get("executor", "slurm")), run_dir, state)


def _final(state: str) -> bool:
    from launch import status

    return status.is_final(state)


def _why(pred: Predecessor) -> str:
    """`` (rank 1 on node2 at ...: DataError: ...)`` from the predecessor's job.json, when it says."""
    if pred.run_dir is None:
        return ""
    data = read_job_file(pred.run_dir)
    attempts = [a for a in data.get("attempts", []) if a["job_id"] == pred.job_id]
    if not attempts:
        return " (no rank started)"
    failure = first_failure(data, attempts[-1])
    return f" ({describe_failure(failure)})" if failure else f" (its last attempt: {attempts[-1].get('result', '?')})"


def refresh(pred: Predecessor) -> Predecessor:
    """The same job with its state now (the run dir may hold newer jobs since: not this one's concern)."""
    data = read_job_file(pred.run_dir) if pred.run_dir is not None else {}
    if any(str(j["job_id"]) == pred.job_id for j in data.get("jobs", [])):
        return _job_of(pred.run_dir, data, pred.job_id)
    return Predecessor(pred.job_id, pred.executor, pred.run_dir, cluster.job_state(pred.job_id))


def sbatch_dependency(pred: Predecessor | None) -> str:
    """sbatch's ``--dependency`` value for a job (or every member of an array) after ``pred``; empty
    when there is nothing to wait for (a completed job may already be purged from SLURM's memory,
    where sbatch would refuse the dependency)."""
    return "" if pred is None or pred.completed else f"{AFTER}:{pred.job_id}"


def describe_plan(pred: Predecessor, kind: str) -> str:
    """One line for the launcher's output: what --after will do here."""
    if pred.completed:
        return f"after: {pred.describe()} is COMPLETED already; submitting without a dependency"
    if kind == "slurm":
        return (
            f"after: {pred.describe()} is {pred.state}; queued with --dependency={sbatch_dependency(pred)} "
            f"--kill-on-invalid-dep=yes (starts when it completes, cancelled if it does not)"
        )
    return f"after: {pred.describe()} is {pred.state}; this launcher waits here until it ends, then submits"


def wait_local(
    pred: Predecessor, run_dir: Path, *, poll_s: float | None = None, out: TextIO | None = None
) -> Predecessor:
    """Poll ``pred`` until it ends (the local executor's afterok); raises checks.Refused unless it completed.
    Meanwhile the dependent ``run_dir``'s job.json says who waits for what (``waiting``), and afterwards,
    if nothing was submitted, why (``not_submitted``), for --status."""
    out = out or sys.stdout
    waiting = {**pred.record(), "launcher_pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def start(data: dict[str, Any]) -> None:
        data.pop("not_submitted", None)  # an earlier wait's verdict
        data["waiting"] = waiting

    update_job_file(run_dir, start)
    try:
        while not _final(pred.state):
            time.sleep(POLL_S if poll_s is None else poll_s)
            now = refresh(pred)
            if now.state != pred.state:
                out.write(f"after: {now.describe()} is {now.state}\n")
                out.flush()
            pred = now
    finally:
        update_job_file(run_dir, lambda data: data.pop("waiting", None))
    if not pred.completed:
        why = f"{pred.describe()} ended {pred.state}{_why(pred)}, not COMPLETED (afterok)"
        update_job_file(run_dir, lambda data: data.update(not_submitted={**pred.record(), "why": why}))
        raise checks.Refused(why)
    return pred


def unsubmitted_summary(run_dir: Path, data: dict[str, Any]) -> str:
    """--status of a run dir whose launcher waits locally for its predecessor, or gave up on it."""
    if data.get("waiting"):
        w = data["waiting"]
        pred = _recorded(w)
        if pid_alive(int(w["launcher_pid"])):
            return (
                f"run {run_dir}: nothing submitted yet: the launcher (pid {w['launcher_pid']}, since {w['since']}) "
                f"is waiting for {pred.describe()} to complete ({w['type']}); it is {pred.state}"
            )
        return f"run {run_dir}: nothing submitted: the launcher that waited for {pred.describe()} is gone"
    if data.get("not_submitted"):
        return f"run {run_dir}: nothing submitted: {data['not_submitted']['why']}"
    raise FileNotFoundError(f"{run_dir / JOB_FILE} records no job: nothing was submitted into {run_dir}")


def check_finetune(cfg: Config, pred: Predecessor | None) -> str:
    """checks.check_finetune, aware of the predecessor: a ``finetune.init_from`` run dir that is still
    training is accepted only when it is the run this job waits for (``--after``); its final checkpoint
    is then read when the job starts, so only what is known now is checked."""
    source = Path(cfg.finetune.init_from) if cfg.finetune.enabled else None
    if source is None or not (source / JOB_FILE).is_file():
        return checks.check_finetune(cfg)
    training = _training_job(source)
    if training is None:
        return checks.check_finetune(cfg)
    if pred is None or not _is_run_of(source, pred):
        raise checks.Refused(
            f"finetune.init_from={source} is a run dir still training (job {training.job_id} {training.state}): "
            f"its newest checkpoint is not its final one. Add --after {source} to start when it completes, or point "
            f"finetune.init_from at one of its checkpoints ({source}/checkpoints/step_*)"
        )
    return f"{_known_architecture(cfg, source)}; its final checkpoint is loaded when {pred.describe()} completes"


def _training_job(run_dir: Path) -> Predecessor | None:
    """The run dir's newest job while it is queued or running, else None."""
    data = read_job_file(run_dir)
    if not data.get("jobs"):
        return None
    newest = _job_of(run_dir, data, str(data["jobs"][-1]["job_id"]))
    return None if _final(newest.state) else newest


def _is_run_of(run_dir: Path, pred: Predecessor) -> bool:
    if pred.run_dir is not None:
        return pred.run_dir.resolve() == run_dir.resolve()
    return pred.job_id in {str(j["job_id"]) for j in read_job_file(run_dir).get("jobs", [])}


def _known_architecture(cfg: Config, run_dir: Path) -> str:
    """The backbone check on what the predecessor recorded so far: a checkpoint, else its config.yaml."""
    from pipeline.finetune import FinetuneError, check_source
    from pipeline.finetune.source import Source, check_architecture

    try:
        return check_source(cfg)  # an earlier checkpoint already records the architecture
    except FinetuneError:
        pass
    saved = _saved_model(run_dir)
    if saved is None:
        return f"finetune: init from {run_dir} (no checkpoint or config.yaml yet: the architecture is checked at start)"
    try:
        check_architecture(Source("checkpoint", run_dir, {}, saved), cfg)
    except FinetuneError as e:
        raise checks.Refused(str(e)) from None
    return f"finetune: init from {run_dir}, same backbone architecture as model.* (its config.yaml)"


def _saved_model(run_dir: Path) -> dict[str, Any] | None:
    model = (read_saved_config(run_dir) or {}).get("model")
    return model if isinstance(model, dict) else None


def _recorded(after: dict[str, Any]) -> Predecessor:
    """A predecessor as job.json recorded it, with its state now."""
    run_dir = Path(after["run_dir"]) if after.get("run_dir") else None
    return refresh(Predecessor(str(after["job_id"]), after.get("executor", "slurm"), run_dir, ""))


def status_lines(job: dict[str, Any], state: str, attempts: int) -> list[str]:
    """--status: what a dependent job waits for, or why it never ran."""
    after = job.get("after")
    if not after:
        return []
    pred = _recorded(after)
    if not _final(pred.state) and attempts == 0:
        return [f"waiting for {pred.describe()} to complete ({after.get('type', AFTER)}); it is {pred.state}"]
    lines = [f"after {pred.describe()}: {pred.state}{_why(pred) if not pred.completed else ''}"]
    if attempts == 0 and _final(state) and not pred.completed:
        lines.append(f"never ran: {pred.describe()} did not complete, so SLURM cancelled this job (afterok)")
    return lines
