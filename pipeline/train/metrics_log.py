"""``<run_dir>/metrics.jsonl``: rank 0's plain record of every metric, one value per key and step.

One JSON object a line, ``{"step": S, "time": T, "<key>": value, ...}`` with the keys of
pipeline/metric_names.py. It needs no server and no mlflow to read: ``launch/demo.py``, the tests
and users read it directly (README, "Metrics: one value per step"), and the next attempt of the run
reads it back to know which steps it already holds.

Why this is not the tracker's ``tracking_wal.jsonl`` (tracking/state.py), although both hold the
same metric values:

- this file exists whenever training runs; the WAL only where a tracker does (``tracking.enabled=
  false`` has none);
- this file is the trajectory that counts: when training goes back to a checkpoint (a NaN rollback,
  a resume after a kill), the lines past that step are removed and re-written by the re-run. The WAL
  must stay append-only and numbered (``seq``) for its delivery guarantee, so it keeps superseded
  points, as MLflow does;
- the WAL also carries params, tags, artifacts and run ends, in the tracker's record format.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.durable import atomic_write

METRICS_FILE = "metrics.jsonl"


def read_metrics_log(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of ``run_dir``'s metrics.jsonl, in file order (``[]`` without one)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-write
    return out


class MetricsLog:
    """The writer (rank 0; on other ranks every call does nothing)."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.logged: dict[str, int] = {}  # the highest step recorded per key
        if not enabled:
            return
        records = read_metrics_log(run_dir)
        for record in records:
            for key in record:
                if key not in ("step", "time"):
                    self.logged[key] = max(self.logged.get(key, -1), int(record["step"]))
        if self.path.is_file() and self.path.read_bytes()[-1:] not in (b"", b"\n"):
            # A kill mid-write left half a line: the next append would join it and be lost too.
            atomic_write(self.path, "".join(json.dumps(rec) + "\n" for rec in records))

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Append the keys not yet recorded at ``step``: a key already there (an evaluation repeated
        by the start of a complete run) is the same trajectory, not written twice."""
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if not self.enabled or not fresh:
            return
        self.logged.update(dict.fromkeys(fresh, step))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **fresh}) + "\n")

    def supersede(self, to_step: int) -> None:
        """Training goes on from the checkpoint of ``to_step``: the lines of later steps leave the file
        (atomically), so their re-run replaces them."""
        if not self.enabled or max(self.logged.values(), default=-1) <= to_step:
            return
        kept = [rec for rec in read_metrics_log(self.path.parent) if int(rec["step"]) <= to_step]
        atomic_write(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))
        self.logged = {k: min(v, to_step) for k, v in self.logged.items()}
