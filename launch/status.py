"""`launch/submit.py --status RUN_DIR` and `--follow`: what a run's jobs did, and the live log.

Reads ``job.json`` (launch/jobfile.py), SLURM's accounting for the job states, the newest complete
checkpoint and the tracker's ``tracking.json`` for the MLflow run id. No submitit here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from launch import cluster, progress
from launch.jobfile import (
    JOB_FILE,
    close_stale_attempts,
    describe_failure,
    first_failure,
    read_job_file,
    update_job_file,
)
from pipeline.proc import pid_alive
from pipeline.tracking import read_tracking_state

FINAL = cluster.FINAL_STATES | {"KILLED"}
# SLURM states in which a job was stopped from outside rather than failing by itself.
_STOPPED = frozenset({"CANCELLED", "PREEMPTED", "TIMEOUT", "DEADLINE"})


def _local_state(job: dict[str, Any], attempts: list[dict[str, Any]]) -> str:
    """A local job's id is its controller's PID: alive means running; else the last attempt's result."""
    if job["job_id"].isdigit() and pid_alive(int(job["job_id"])) and not _finished(attempts):
        return "RUNNING"
    if not attempts:
        return "FAILED (no rank started)" if not pid_alive(int(job["job_id"])) else "PENDING"
    states = {"completed": "COMPLETED", "preempted": "PREEMPTED", "failed": "FAILED", "killed": "KILLED"}
    states["cancelled"] = "CANCELLED"
    return states.get(attempts[-1].get("result", ""), "FAILED (ended without a result)")


def _finished(attempts: list[dict[str, Any]]) -> bool:
    return bool(attempts) and attempts[-1].get("result") == "completed"


def job_states(data: dict[str, Any]) -> dict[str, str]:
    """job id -> state, from SLURM (squeue, then sacct) or, for local jobs, the process and job.json."""
    states: dict[str, str] = {}
    slurm_ids = [j["job_id"] for j in data.get("jobs", []) if j.get("executor") == "slurm"]
    accounting = cluster.sacct_jobs(slurm_ids)
    for job in data.get("jobs", []):
        jid = job["job_id"]
        attempts = [a for a in data.get("attempts", []) if a["job_id"] == jid]
        if job.get("executor") == "slurm":
            live = cluster.squeue_state(jid)
            states[jid] = live or (accounting[jid].state if jid in accounting else "UNKNOWN (no sacct record)")
        else:
            states[jid] = _local_state(job, attempts)
    return states


def _last_checkpoint(run_dir: Path) -> str:
    from pipeline.artifacts.checkpoints import CheckpointError, inspect_run_dir

    try:
        info = inspect_run_dir(run_dir)
    except CheckpointError as e:
        return f"none complete ({e})"
    return "none" if info is None else f"step {info.step} ({info.tag}, saved by {info.world_size} ranks)"


def _mlflow_run_id(run_dir: Path, data: dict[str, Any]) -> str:
    state = read_tracking_state(run_dir)
    if state.get("run_id"):
        return str(state["run_id"])
    ids = [a.get("mlflow_run_id") for a in data.get("attempts", []) if a.get("mlflow_run_id")]
    return ids[-1] if ids else "-"


def is_final(state: str) -> bool:
    return state.split()[0] in FINAL if state else False


def reconcile(run_dir: Path, data: dict[str, Any], states: dict[str, str]) -> list[str]:
    """Close the attempts whose job is gone without a result (rank 0 SIGKILLed, OOM, scancel) and end
    the MLflow run they left RUNNING. Nothing is touched while any job of the run dir is still active
    (a requeued attempt may be about to continue that MLflow run). Returns what was changed."""
    if not states or not all(is_final(s) for s in states.values()):
        return []
    notes: list[str] = []
    for job in data.get("jobs", []):
        jid, state = job["job_id"], states[job["job_id"]]
        stale = [a for a in data.get("attempts", []) if a["job_id"] == jid and "ended" not in a]
        if not stale:
            continue
        own_error = any(first_failure(data, a) for a in stale)
        stopped = state.split()[0] in _STOPPED or (job.get("executor") != "slurm" and not own_error)
        result = "failed" if own_error or not stopped else "killed"
        why = f"job {jid} is {state} but the attempt never recorded its end (noted by a later status check)"
        for a in close_stale_attempts(run_dir, jid, result, why):
            notes.append(f"attempt restart={a.get('restart')} of job {jid}: was 'running', is {result} ({state})")
    newest = read_job_file(run_dir).get("attempts", [])[-1:]
    if newest and newest[0].get("result") in ("failed", "killed") and not newest[0].get("mlflow_checked"):
        from pipeline.tracking import TrackingUnavailable, end_orphaned_run

        try:
            done = end_orphaned_run(run_dir, "KILLED" if newest[0]["result"] == "killed" else "FAILED")
        except TrackingUnavailable as e:  # a status query must still print; asked again next time
            return [*notes, f"{e}; its status is checked again by the next --status"]
        notes += [done] if done else []
        update_job_file(run_dir, lambda data: data["attempts"][-1].update(mlflow_checked=True))
    return notes


def outcome_lines(data: dict[str, Any], attempt: dict[str, Any], run_dir: Path) -> list[str]:
    """What really ended ``attempt``: the first failing rank's error, or that none reported one."""
    lines = []
    first = first_failure(data, attempt)
    if first is not None:
        lines.append(f"first failure: {describe_failure(first)}")
    elif attempt.get("result") in ("failed", "killed"):
        lines.append(
            "no rank reported an error of its own: a rank was killed from outside (SIGKILL, out of memory, "
            "scancel, a lost node); see the ranks' logs under " + str(run_dir / "submitit")
        )
        peer = first_failure(data, attempt, secondary=True)
        if peer is not None:
            lines.append(f"then lost its peer: {describe_failure(peer)}")
    if attempt.get("undelivered"):
        lines.append(
            f"{attempt['undelivered']} tracking record(s) never reached the tracking store: they stay in "
            f"{run_dir / 'tracking_buffer.jsonl'} and are replayed at the next start of this run"
        )
    return lines


def summarise(run_dir: str | Path) -> str:
    """The --status text; raises FileNotFoundError when ``run_dir`` has no job.json."""
    run_dir = Path(run_dir)
    data = read_job_file(run_dir)
    if not data:
        raise FileNotFoundError(
            f"{run_dir / JOB_FILE} does not exist: {run_dir} is not a run directory launched by launch/submit.py"
        )
    if not data.get("jobs"):
        from launch import chain

        return chain.unsubmitted_summary(run_dir, data)  # its launcher waits (or waited) for a predecessor
    states = job_states(data)
    notes = reconcile(run_dir, data, states)
    if notes:
        data = read_job_file(run_dir)
        states = job_states(data)
    lines = [f"run {data.get('name', '?')}: {run_dir}"]
    lines += [f"  reconciled: {n}" for n in notes]
    for job in data["jobs"]:
        jid = job["job_id"]
        attempts = [a for a in data["attempts"] if a["job_id"] == jid]
        hosts = attempts[-1].get("hosts", []) if attempts else []
        if attempts and attempts[-1].get("undelivered"):
            states[jid] += " (metrics not all delivered to the tracking store)"
        lines.append(
            f"  job {jid} ({job.get('executor')}, {job.get('nodes')} node(s) x {job.get('tasks_per_node')} tasks): "
            f"{states[jid]}; submitted {job.get('submitted', '?')}; attempts {len(attempts)}"
            + (f"; nodes {','.join(hosts)}" if hosts else "")
        )
        lines += [f"    {line}" for line in _after_lines(job, states[jid], len(attempts))]
        for a in attempts:
            result = a.get("result", "running")
            step = f" at step {a['step']}" if "step" in a else ""
            when = f"{a.get('started')} .. {a.get('ended', '')}"
            lines.append(f"    attempt restart={a.get('restart')}: {result}{step} ({when})")
            lines += [f"      {line}" for line in outcome_lines(data, a, run_dir)]
    lines.append(f"  requeues: {data.get('requeues', 0)}")
    p = progress.read_progress(run_dir)
    lines.append(f"  progress: {progress.progress_line(p) if p else 'no training step logged yet'}")
    lines.append(f"  last checkpoint: {_last_checkpoint(run_dir)}")
    lines.append(f"  MLflow run id: {_mlflow_run_id(run_dir, data)}")
    lines.append(f"  MLflow run: {progress.run_link(run_dir)}")
    newest = data["jobs"][-1]
    lines.append(f"  rank 0 log: {rank0_log(newest)}")
    lines.append(f"  logs: {run_dir / 'submitit'}")
    return "\n".join(lines)


def _after_lines(job: dict[str, Any], state: str, attempts: int) -> list[str]:
    from launch import chain  # it reads job states through this module

    return chain.status_lines(job, state, attempts)


def rank0_log(job: dict[str, Any]) -> Path:
    """submitit's stdout file of a job's first task (``<folder>/<job id>_0_log.out``), on SLURM and locally."""
    return Path(job["folder"]) / f"{job['job_id']}_0_log.out"


def final_report(run_dir: Path, job_id: str, state: str) -> tuple[list[str], bool]:
    """After a followed job ended: reconcile, then what ended its newest attempt, and whether its
    metrics all reached the tracking store."""
    data = read_job_file(run_dir)
    notes = reconcile(run_dir, data, job_states(data)) if data else []
    data = read_job_file(run_dir) if notes else data
    attempts = [a for a in data.get("attempts", []) if a["job_id"] == job_id]
    if not attempts:
        return notes + [f"job {job_id} ({state}) started no rank; see {run_dir / 'submitit'}"], True
    newest = attempts[-1]
    lines = notes + outcome_lines(data, newest, run_dir) + progress.summary_lines(run_dir, data)
    return lines, not newest.get("undelivered")


class _Tail:
    """Prints what was appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out, self.offset = path, out, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        if chunk:
            self.offset += len(chunk)
            self.out.write(chunk.decode(errors="replace"))
            self.out.flush()


def follow(logs: tuple[Path, ...], state: Callable[[], str], *, poll_s: float = 2.0, out: TextIO = sys.stdout) -> str:
    """Stream ``logs`` (rank 0's stdout and stderr) until ``state()`` is final; returns that state."""
    tails = [_Tail(p, out) for p in logs]
    last = ""
    while True:
        current = state()
        for t in tails:
            t.pump()
        if current != last:
            out.write(f"[launch] job state: {current}\n")
            out.flush()
            last = current
        if current in cluster.FINAL_STATES:
            time.sleep(poll_s)  # the last lines may land after the state changes
            for t in tails:
                t.pump()
            return current
        time.sleep(poll_s)
