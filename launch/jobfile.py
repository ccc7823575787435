"""``<run_dir>/job.json``: which jobs ran this run, on which nodes, and how often they were requeued.

Written by two parties: the launcher when it submits (a ``jobs`` entry) and global rank 0 of every
attempt (an ``attempts`` entry at start, completed at the end). Each write is a read-modify-write
under an exclusive ``flock`` and an atomic rename, so a reader never sees half a file.

    {"name": "smoke", "run_dir": "...",
     "jobs": [{"job_id": "7", "executor": "slurm", "submitted": "...", "nodes": 2, "tasks_per_node": 1,
               "folder": ".../submitit/7", "command": "python launch/submit.py ..."}],
     "attempts": [{"job_id": "7", "restart": 0, "hosts": ["node1", "node2"], "started": "...",
                   "ended": "...", "result": "preempted", "step": 17, "mlflow_run_id": "..."}],
     "failures": [{"job_id": "7", "restart": 1, "rank": 1, "host": "node2", "time": 1764650000.12,
                   "at": "...", "error": "DataError: ...", "secondary": false}],
     "requeues": 1}

Every rank that stops with an exception adds a ``failures`` entry; an attempt's ``failure`` is the
first one that is not merely a lost peer (see :func:`first_failure`). An attempt whose job is gone
without a result (SIGKILL, OOM, ``scancel``) is closed by :func:`close_stale_attempts` (called by
``--status`` and the launcher) with result "killed" or "failed".
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.durable import atomic_write

JOB_FILE = "job.json"
_LOCK_FILE = ".job.json.lock"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / _LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_job_file(run_dir: str | Path) -> dict[str, Any]:
    """The run's job.json, or {} when there is none (or it cannot be parsed)."""
    try:
        data = json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_job_file(run_dir: str | Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to job.json in place, under the lock; returns the new content."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        data = read_job_file(run_dir)
        data.setdefault("jobs", [])
        data.setdefault("attempts", [])
        change(data)
        for attempt in data["attempts"]:
            first = first_failure(data, attempt)
            if first is not None:
                attempt["failure"] = {k: first[k] for k in ("rank", "host", "at", "error")}
        # A requeue is every attempt of a job after its first.
        jobs_seen = {a["job_id"] for a in data["attempts"]}
        data["requeues"] = len(data["attempts"]) - len(jobs_seen)
        atomic_write(run_dir / JOB_FILE, json.dumps(data, indent=2) + "\n")
    return data


def record_submission(run_dir: str | Path, *, name: str, job: dict[str, Any]) -> None:
    """Add a submitted job (``job_id``, ``executor``, ``nodes``, ``tasks_per_node``, ``folder``, ...)."""

    def change(data: dict[str, Any]) -> None:
        data["name"] = name
        data["run_dir"] = str(run_dir)
        data["jobs"].append({"submitted": _now(), **job})

    update_job_file(run_dir, change)


def record_attempt_start(run_dir: str | Path, *, job_id: str, restart: int, hosts: list[str]) -> None:
    def change(data: dict[str, Any]) -> None:
        data["attempts"].append({"job_id": job_id, "restart": restart, "hosts": hosts, "started": _now()})

    update_job_file(run_dir, change)


def record_attempt_end(run_dir: str | Path, *, job_id: str, result: str, **fields: Any) -> None:
    """Close the newest open attempt of ``job_id`` with its ``result`` ("completed", "preempted", "failed",
    "cancelled": stopped by SIGTERM, e.g. scancel)."""

    def change(data: dict[str, Any]) -> None:
        for attempt in reversed(data["attempts"]):
            if attempt["job_id"] == job_id and "ended" not in attempt:
                attempt.update(ended=_now(), result=result, **fields)
                return

    update_job_file(run_dir, change)


# What a rank sees when another rank died first (gloo, NCCL, TCPStore): a consequence, not a cause.
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited|"
    r"NCCL communicator was aborted|DistNetworkError|failed to recv|Socket Timeout|ProcessGroupGloo.*Timed out",
    re.IGNORECASE,
)


def is_peer_loss(error: str) -> bool:
    """Whether an error text only says that another rank went away."""
    return bool(_PEER_LOST.search(error))


def record_failure(run_dir: str | Path, *, job_id: str, restart: int, rank: int, host: str, error: str) -> None:
    """One rank's exception, with the wall-clock time so the first failing rank can be told."""
    entry = {
        "job_id": job_id,
        "restart": restart,
        "rank": rank,
        "host": host,
        "time": time.time(),
        "at": _now(),
        "error": error[:2000],
        "secondary": is_peer_loss(error),
    }
    update_job_file(run_dir, lambda data: data.setdefault("failures", []).append(entry))


def first_failure(data: dict[str, Any], attempt: dict[str, Any], *, secondary: bool = False) -> dict[str, Any] | None:
    """The attempt's first failure that is not a lost peer (``secondary``: its first lost-peer report)."""
    mine = [
        f
        for f in data.get("failures", [])
        if f["job_id"] == attempt["job_id"] and f["restart"] == attempt.get("restart") and f["secondary"] == secondary
    ]
    return min(mine, key=lambda f: f["time"]) if mine else None


def describe_failure(failure: dict[str, Any]) -> str:
    """``rank 1 on node2 at <time>: DataError: ...`` (the first line of the error)."""
    first_line = failure["error"].strip().splitlines()[0] if failure["error"].strip() else "?"
    return f"rank {failure['rank']} on {failure['host']} at {failure['at']}: {first_line}"


def close_stale_attempts(run_dir: str | Path, job_id: str, result: str, why: str) -> list[dict[str, Any]]:
    """Close the open attempts of ``job_id`` (its job is gone) with ``result``; returns those closed."""
    closed: list[dict[str, Any]] = []

    def change(data: dict[str, Any]) -> None:
        for attempt in data["attempts"]:
            if attempt["job_id"] == job_id and "ended" not in attempt:
                attempt.update(ended=_now(), result=result, reconciled=why)
                closed.append(attempt)

    update_job_file(run_dir, change)
    return closed


def amend_attempt(run_dir: str | Path, *, job_id: str, **fields: Any) -> None:
    """Change the newest attempt of ``job_id``, closed or not (a stop first marked "cancelled" that
    turned out to be a preemption)."""

    def change(data: dict[str, Any]) -> None:
        for attempt in reversed(data["attempts"]):
            if attempt["job_id"] == job_id:
                attempt.update(**fields)
                return

    update_job_file(run_dir, change)
