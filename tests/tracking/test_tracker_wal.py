"""No metric lost, none duplicated: the tracker's write-ahead log against a real ``mlflow server``.

A writer SIGKILLed with points still in its queue loses none of them (the next tracker of the run
replays the unsettled tail of tracking_wal.jsonl), and a replay of points the server already has
(a kill between delivery and the settled marker) leaves one point per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import find_run, metric_history, open_tracker
from pipeline.tracking.state import WAL_FILE, WriteAheadLog
from tests.fixtures.mlflow_server import MlflowTestServer

pytestmark = pytest.mark.timeout(180)

STEPS = 200


def _cfg(server: MlflowTestServer) -> TrackingConfig:
    return TrackingConfig(uri=server.url, timeout_s=5.0, max_retries=0, retry_s=0.5, system_metrics=False)


def _wal(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / WAL_FILE).read_text().splitlines()]


def test_points_queued_at_a_sigkill_reach_mlflow_at_the_next_start_once_each(
    mlflow_server: MlflowTestServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    script = f"""
import os, signal, time
from pathlib import Path
from pipeline.config import TrackingConfig
from pipeline.tracking import open_tracker
cfg = TrackingConfig(uri={mlflow_server.url!r}, timeout_s=5.0, max_retries=0, system_metrics=False)
tracker = open_tracker(cfg, run_dir=Path({str(run_dir)!r}), experiment="wal", run_name="killed")
for step in range(1, {STEPS + 1}):
    tracker.log_metrics({{"train/loss": 1.0 / step}}, step)
os.kill(os.getpid(), signal.SIGKILL)  # the points are still in the queue (one request per 0.5 s window)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    before = metric_history(mlflow_server.url, run_id, "train/loss")
    assert len(before) < STEPS, "the kill came too late to leave points in the queue"
    wal = _wal(run_dir)
    assert [r["step"] for r in wal if r["t"] == "m"] == list(range(1, STEPS + 1))  # all on disk before the kill
    assert [r["seq"] for r in wal] == list(range(1, len(wal) + 1))

    again = open_tracker(_cfg(mlflow_server), run_dir=run_dir, experiment="wal", run_name="killed")
    assert again.run_id == run_id
    again.log_metrics({"train/loss": 9.0}, STEPS)  # recorded before the kill: dropped, not a second value
    again.log_metrics({"train/loss": 0.001}, STEPS + 1)
    again.close()
    expected = [(s, 1.0 / s) for s in range(1, STEPS + 1)] + [(STEPS + 1, 0.001)]
    assert metric_history(mlflow_server.url, run_id, "train/loss") == expected
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["wal_settled"] == _wal(run_dir)[-1]["seq"]
    assert find_run(run_dir).status == "FINISHED"

    # A kill between delivery and the settled marker: the next start replays points the server
    # already has. MLflow's store keeps one row per (key, step, timestamp, value): still one each.
    state["wal_settled"] = 0
    (run_dir / "tracking.json").write_text(json.dumps(state))
    open_tracker(_cfg(mlflow_server), run_dir=run_dir, experiment="wal", run_name="killed").close()
    assert metric_history(mlflow_server.url, run_id, "train/loss") == expected


def test_a_line_torn_by_a_kill_is_cut_and_the_log_goes_on(tmp_path: Path) -> None:
    path = tmp_path / WAL_FILE
    wal = WriteAheadLog(path)
    for step in (1, 2):
        wal.append({"t": "m", "step": step, "ts": 0, "v": {"train/loss": float(step)}})
    wal.close()
    with open(path, "a") as f:
        f.write('{"t": "m", "step": 3, "ts": 0, "v": {"train/lo')  # the kill hit mid-append
    wal = WriteAheadLog(path)
    assert [r["step"] for r in wal.records] == [1, 2] and wal.next_seq == 3
    wal.append({"t": "m", "step": 3, "ts": 0, "v": {"train/loss": 3.0}})
    wal.close()
    assert [(r["seq"], r["step"]) for r in _wal(tmp_path)] == [(1, 1), (2, 2), (3, 3)]


def test_the_write_ahead_append_keeps_log_metrics_cheap(mlflow_server: MlflowTestServer, tmp_path: Path) -> None:
    tracker = open_tracker(_cfg(mlflow_server), run_dir=tmp_path / "run", experiment="wal", run_name="cost")
    latencies = []
    for step in range(1, 2001):
        t = time.perf_counter()
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3, "train/img_per_s": 500.0}, step)
        latencies.append(time.perf_counter() - t)
    tracker.close()
    latencies.sort()
    median, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * len(latencies))]
    print(f"log_metrics with the write-ahead append: median {median * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")
    assert median < 200e-6 and p99 < 5e-3, (median, p99)
    assert len(metric_history(mlflow_server.url, tracker.run_id, "train/loss")) == 2000
