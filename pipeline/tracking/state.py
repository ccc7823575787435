"""What a run directory remembers about its MLflow run, on local disk.

- ``tracking.json``: the run id, store URI and experiment, and the last step recorded per metric
  key, so a requeue finds its run even before the first checkpoint and drops repeated steps.
- ``tracking_buffer.jsonl``: records the store has not confirmed yet (server down or hanging);
  replayed in order when it answers again, or by the next tracker of this run.
- ``tracking_wal.jsonl``: the write-ahead log. Every record the writer accepts is appended here,
  numbered (``seq``), by the caller before it is queued; ``tracking.json``'s ``wal_settled`` is the
  highest ``seq`` up to which every record was delivered, refused or moved to the buffer file. A
  kill loses nothing: the next tracker of the run moves the unsettled tail into the buffer. It is
  also the run's history for the loss/accuracy plot. It is not ``metrics.jsonl``
  (train/metrics_log.py), although both hold the metric values: the WAL exists only where a tracker
  does, carries params, tags and artifacts too, and must stay append-only for its numbering, so it
  keeps the points a rollback superseded (as MLflow does); ``metrics.jsonl`` is written with
  tracking off too and holds only the trajectory that counts (one value per key and step).
- ``tracking.lock``: the writer's lease, so two jobs never write into one run.

No mlflow import here: these are plain files, read by the launcher and the compare CLI too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.durable import atomic_write
from pipeline.proc import pid_alive

log = logging.getLogger(__name__)

TRACKING_STATE_FILE = "tracking.json"
BUFFER_FILE = "tracking_buffer.jsonl"
WAL_FILE = "tracking_wal.jsonl"
LOCK_FILE = "tracking.lock"
LEASE_STALE_S = 60.0  # a writer that has not renewed its lease for this long is gone

Record = dict[str, Any]  # {"t": "m"|"p"|"g"|"a"|"i"|"model"|"end", ...}; see tracker.py


_STATE_LOCK = threading.Lock()


def read_tracking_state(run_dir: str | Path) -> dict[str, Any]:
    """The ``tracking.json`` of a run directory (``{}`` if there is none)."""
    path = Path(run_dir) / TRACKING_STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_tracking_state(run_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into ``tracking.json``."""
    with _STATE_LOCK:
        state = read_tracking_state(run_dir)
        state.update(fields)
        atomic_write(run_dir / TRACKING_STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


class JsonlFile:
    """An append-only JSON-lines file, safe to use from the tracker's threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r) + "\n" for r in records)
        with self._lock, open(self.path, "a") as f:
            f.write(text)

    def read(self) -> list[Record]:
        """All complete records; a torn last line (a kill mid-write) is skipped."""
        with self._lock:
            if not self.path.is_file():
                return []
            lines = self.path.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping unreadable line %d", self.path, i + 1)
        return out

    def replace(self, records: list[Record]) -> None:
        """Rewrite the file with ``records`` (none: remove it)."""
        with self._lock:
            if not records:
                self.path.unlink(missing_ok=True)
                return
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def take(self, count: int) -> None:
        """Drop the first ``count`` records (those just delivered), keeping any appended since."""
        with self._lock:
            if not self.path.is_file():
                return
            lines = self.path.read_text().splitlines(keepends=True)
            rest = lines[count:]
            if not rest:
                self.path.unlink()
                return
            atomic_write(self.path, "".join(rest))


class WriteAheadLog:
    """Append-only, numbered records; each append is flushed to the OS at once (a killed process
    loses nothing) and fsynced by :meth:`sync` (the tracker's thread calls it about once a second, so
    a crash of the machine itself loses at most that second; an fsync per metric would cost ~ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.records = self._read_and_repair()
        self.next_seq = max((int(r.get("seq", 0)) for r in self.records), default=0) + 1
        self._f = open(path, "a")  # noqa: SIM115 - held for the tracker's lifetime, closed by close()

    def _read_and_repair(self) -> list[Record]:
        """The complete records; a torn last line (a kill mid-append) is cut off, so the next
        append does not glue onto it."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        out = []
        for i, line in enumerate(raw[:end].splitlines()):
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping unreadable line %d", self.path, i + 1)
        return out

    def append(self, record: Record) -> None:
        with self._lock:
            record["seq"] = self.next_seq
            self.next_seq += 1
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def sync(self) -> None:
        with self._lock:
            if not self._f.closed:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()


def last_steps(records: list[Record]) -> dict[str, int]:
    """The highest step per metric key among metric records."""
    out: dict[str, int] = {}
    for r in records:
        if r.get("t") == "m":
            for key in r["v"]:
                out[key] = max(out.get(key, -1), int(r["step"]))
    return out


def merge_steps(*maps: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = max(out.get(k, -1), int(v))
    return out


def node_name() -> str:
    """This node's name: SLURM's node name (unique even with several slurmd on one host), else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class RunDirLease:
    """The writer's claim on a run directory, renewed while it runs.

    A second job that opens a writer on the same run directory while the first still renews
    its lease is refused: it would write into the same MLflow run. A requeue of the same SLURM
    job, a process that died on this host, or a lease not renewed for ``LEASE_STALE_S`` is taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.me = {"host": node_name(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID", "")}

    def acquire(self) -> None:
        holder = self._holder()
        if holder and not self._can_take(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise RuntimeError(
                f"{self.path.parent} is tracked by another job (SLURM job {holder.get('job_id') or '-'}, "
                f"host {holder.get('host')}, pid {holder.get('pid')}, lease renewed {age:.0f} s ago): two jobs "
                f"must not write into one MLflow run. Give this job its own train.run_dir, or stop the other "
                f"job (a lease not renewed for {LEASE_STALE_S:.0f} s is taken over)."
            )
        self.renew()

    def renew(self) -> None:
        atomic_write(self.path, json.dumps({**self.me, "heartbeat": time.time()}, indent=1, sort_keys=True))

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _can_take(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > LEASE_STALE_S:
            return True
        if self.me["job_id"] and holder.get("job_id") == self.me["job_id"]:
            return True  # a requeue of the same job: the old incarnation is gone
        if holder.get("host") == self.me["host"]:
            return holder.get("pid") == self.me["pid"] or not pid_alive(int(holder.get("pid", 0)))
        return False
