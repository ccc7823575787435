"""The tracker against a real ``mlflow server`` on 127.0.0.1 (the shared one; the last test kills
it and starts it again)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import find_run, list_artifacts, metric_history, open_tracker
from pipeline.tracking.state import BUFFER_FILE
from tests.fixtures.mlflow_server import MlflowTestServer

pytestmark = pytest.mark.timeout(120)


def _cfg(server: MlflowTestServer, **kw: object) -> TrackingConfig:
    return TrackingConfig(uri=server.url, **{"timeout_s": 2.0, "max_retries": 0, "retry_s": 0.5, **kw})  # type: ignore[arg-type]


def test_server_run_gets_params_metrics_artifacts_and_per_node_system_metrics(
    mlflow_server: MlflowTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("SLURMD_NODENAME", "node1")
    run_dir = tmp_path / "run"
    params = {"optim.lr": 0.001, "model.dim": 64}
    writer = open_tracker(
        _cfg(mlflow_server),
        run_dir=run_dir,
        experiment="pretrain",
        run_name="tiny-lr1e-3",
        params=params,
        tags={},
        num_nodes=2,  # from the caller's distributed environment: the writer names its node too
    )
    monkeypatch.setenv("SLURMD_NODENAME", "node2")  # the second node's local rank 0, same run
    node = open_tracker(_cfg(mlflow_server), run_dir=run_dir, experiment="", run_name="", role="node")
    assert node.run_id == writer.run_id
    for step in range(1, 31):
        writer.log_metrics({"train/loss": 3.0 - step / 10, "train/mfu": 0.4}, step)
        time.sleep(0.05)  # a training step; system metrics sample meanwhile
    writer.log_metrics({"eval/top1": 0.75}, 30)
    (run_dir / "config.yaml").write_text("optim:\n  lr: 0.001\n")
    writer.log_artifact(run_dir / "config.yaml")
    node.close()
    writer.close()

    summary = find_run(run_dir)
    assert summary.tracking_uri == mlflow_server.url and summary.status == "FINISHED"
    assert summary.params == {"optim.lr": "0.001", "model.dim": "64"}
    assert summary.metrics["eval/top1"] == 0.75 and summary.metrics["train/mfu"] == 0.4
    assert [s for s, _ in metric_history(mlflow_server.url, summary.run_id, "train/loss")] == list(range(1, 31))
    assert list_artifacts(mlflow_server.url, summary.run_id) == ["config.yaml", "plots/metrics.png"]
    system = {k for k in summary.metrics if k.startswith("system/")}
    assert "system/node1/cpu_utilization_percentage" in system, sorted(system)
    assert "system/node2/cpu_utilization_percentage" in system, sorted(system)


def test_requeue_before_first_checkpoint_continues_the_same_run(
    mlflow_server: MlflowTestServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    kw = {"run_dir": run_dir, "experiment": "pretrain", "run_name": "tiny", "params": {"optim.lr": 0.001}}
    first = open_tracker(_cfg(mlflow_server, system_metrics=False), **kw)  # type: ignore[arg-type]
    for step in range(1, 6):
        first.log_metrics({"train/loss": float(step)}, step)
    first.close("KILLED")
    # No checkpoint yet, so no run id to pass: tracking.json names the run.
    second = open_tracker(_cfg(mlflow_server, system_metrics=False), **kw, tags={"slurm.restart_count": "1"})  # type: ignore[arg-type]
    assert second.run_id == first.run_id
    for step in range(1, 8):
        second.log_metrics({"train/loss": 10.0 + step}, step)
    second.close()
    summary = find_run(run_dir)
    assert summary.status == "FINISHED" and summary.tags["slurm.restart_count"] == "1"
    history = metric_history(mlflow_server.url, summary.run_id, "train/loss")
    assert history == [(s, float(s)) for s in range(1, 6)] + [(6, 16.0), (7, 17.0)]


def test_server_killed_mid_run_training_keeps_pace_and_metrics_arrive_after_restart(
    mlflow_server: MlflowTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tracker = open_tracker(
        _cfg(mlflow_server, system_metrics=False), run_dir=run_dir, experiment="pretrain", run_name="outage"
    )

    def train(steps: range) -> list[float]:
        latencies = []
        for step in steps:
            time.sleep(0.002)  # the training step
            t = time.perf_counter()
            tracker.log_metrics({"train/loss": 1000.0 / step, "train/img_per_s": float(step)}, step)
            latencies.append(time.perf_counter() - t)
        return latencies

    up = train(range(1, 51))
    mlflow_server.kill()
    try:
        t0 = time.monotonic()
        down = train(range(51, 251))  # 200 steps while the server is dead
        elapsed = time.monotonic() - t0
        _wait_for(lambda: (run_dir / BUFFER_FILE).exists(), "metrics buffered to the local file", 30)
    finally:
        mlflow_server.start()  # same port, same store (and the shared server is back for later tests)
    print(f"200 log_metrics calls, server down: {sum(down) * 1e3:.2f} ms in total, max {max(down) * 1e3:.3f} ms")
    assert sum(down) < 1.0 and max(down) < 0.05, f"log_metrics while down: sum {sum(down):.3f} s, max {max(down):.3f} s"
    assert elapsed < 0.002 * 200 + 1.5, f"200 steps took {elapsed:.2f} s while the server was down"
    train(range(251, 261))
    _wait_for(
        lambda: len(metric_history(mlflow_server.url, tracker.run_id, "train/loss")) == 260,
        "buffered metrics replayed to the restarted server",
        60,
    )
    tracker.close()
    history = metric_history(mlflow_server.url, tracker.run_id, "train/loss")
    assert history == [(s, 1000.0 / s) for s in range(1, 261)]
    assert metric_history(mlflow_server.url, tracker.run_id, "train/img_per_s")[-1] == (260, 260.0)
    assert find_run(run_dir).status == "FINISHED"
    assert not (run_dir / BUFFER_FILE).exists()
    warnings = [r.getMessage() for r in caplog.records if "buffered in" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert max(up) < 0.05
    assert json.loads((run_dir / "tracking.json").read_text())["last_steps"]["train/loss"] == 260


def _wait_for(cond: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
