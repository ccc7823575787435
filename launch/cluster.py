"""SLURM's command-line tools, asked directly: is a controller there, what state is a job in.

No submitit here (only launch/executor.py imports it). Every call has a timeout: a login node whose
controller is down must not hang the launcher.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

PROBE_TIMEOUT_S = 5.0
# SLURM states after which a job will not run again (a requeued job passes through REQUEUED/PENDING).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str


def probe_slurm(timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Whether a SLURM controller answers here: `sbatch` on PATH and `sinfo` replies in time.

    The binaries alone prove nothing (a login node with slurm-client but no reachable controller),
    so the controller is asked.
    """
    if shutil.which("sbatch") is None:
        return Probe(False, "sbatch is not on PATH")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Probe(False, f"sinfo did not answer within {timeout_s:.0f} s (no SLURM controller reachable)")
    except OSError as e:
        return Probe(False, f"sinfo could not run ({e})")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]  # sinfo's last line is its verdict
        return Probe(False, f"sinfo failed: {last}")
    partitions = ", ".join(p.strip() for p in out.stdout.split()) or "none"
    return Probe(True, f"sinfo answered (partitions: {partitions})")


def _run(cmd: list[str], timeout_s: float = 15.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # "RUNNING", "COMPLETED", ... ("CANCELLED by 0" is shortened to "CANCELLED")
    exit_code: str = ""
    elapsed: str = ""
    nodes: str = ""


def _short_state(raw: str) -> str:
    return raw.split()[0].rstrip("+") if raw.strip() else "UNKNOWN"


def squeue_state(job_id: str) -> str | None:
    """The live state from the controller, or None once the job has left its queue."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    lines = (out or "").split()
    return _short_state(lines[0]) if lines else None


def sacct_jobs(job_ids: list[str]) -> dict[str, JobInfo]:
    """The accounting records of ``job_ids`` (the newest attempt of each); {} without sacct."""
    if not job_ids:
        return {}
    # `sacct -j 42_1` does not list a task that never started; `sacct -j 42` lists its array's record.
    query = list(dict.fromkeys([*job_ids, *(j.partition("_")[0] for j in job_ids if "_" in j)]))
    out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Elapsed,NodeList", "-j", ",".join(query)])
    infos: dict[str, JobInfo] = {}
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) != 5:
            continue
        for job_id in _record_covers(parts[0], job_ids):
            infos.setdefault(job_id, JobInfo(job_id, _short_state(parts[1]), parts[2], parts[3], parts[4]))
    return infos


def _record_covers(record_id: str, job_ids: list[str]) -> list[str]:
    """The ids of ``job_ids`` an accounting record stands for: itself, or, for the one record SLURM keeps
    of array tasks that never started (``42_[0-3%2]``, ``42_[1,3]``: e.g. cancelled while pending on a
    dependency), each task ``42_<i>`` in its index list."""
    if record_id in job_ids:
        return [record_id]
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", record_id)
    if not m:
        return []
    indices: set[int] = set()
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        indices.update(range(int(lo), int(hi or lo) + 1))
    return [j for j in job_ids if j.startswith(f"{m.group(1)}_") and j.partition("_")[2].isdigit()
            and int(j.partition("_")[2]) in indices]  # fmt: skip


def job_state(job_id: str) -> str:
    """Live state from squeue while the job is queued or running, else the accounting record."""
    live = squeue_state(job_id)
    if live is not None:
        return live
    info = sacct_jobs([job_id]).get(job_id)
    return info.state if info else "UNKNOWN"


def kill_wait_s() -> float | None:
    """SLURM's KillWait: seconds from SIGTERM to SIGKILL when a job is cancelled or ends; None if unknown."""
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^KillWait\s*=\s*(\d+)\s*sec", out or "", re.MULTILINE)
    return float(m.group(1)) if m else None


def parse_time_min(text: str) -> int:
    """SLURM's time formats -> whole minutes: "90", "1:30:00", "2-00:00:00", "1-12" (days-hours)."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"--time {text!r} is not a SLURM time: use minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None and b is None:  # "90": minutes
        minutes = a
    elif days is not None and b is None:  # "1-12": days-hours
        minutes = days * 1440 + a * 60
    elif c is None:  # "1:30" = MM:SS in SLURM; "1-01:30" = D-HH:MM
        minutes = (days or 0) * 1440 + (a * 60 + b if days is not None else a + (1 if b else 0))
    else:  # HH:MM:SS or D-HH:MM:SS; seconds round up
        minutes = (days or 0) * 1440 + a * 60 + b + (1 if c else 0)
    if minutes < 1:
        raise ValueError(f"--time {text!r} is under one minute; SLURM needs at least 1")
    return minutes


def max_array_size() -> int | None:
    """SLURM's MaxArraySize: a job array's indices must stay below it; None if unknown."""
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out or "", re.MULTILINE)
    return int(m.group(1)) if m else None
