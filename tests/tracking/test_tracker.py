"""The tracker against the default local store (SQLite beside the run directories, no server),
and against a server that accepts connections but never answers."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking import Tracker, find_run, list_artifacts, metric_history, open_tracker
from pipeline.tracking.state import BUFFER_FILE, LOCK_FILE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local store (runs/mlflow.db) for the module: creating its tables takes seconds."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


LOCAL = TrackingConfig(system_metrics=False)


def _open(run_dir: Path, cfg: TrackingConfig = LOCAL, **kw: object) -> Tracker:
    kw.setdefault("params", {"optim.lr": 0.001, "train.zero_stage": 2})
    kw.setdefault("tags", {"slurm.job_id": "77"})
    return open_tracker(cfg, run_dir=run_dir, experiment="pretrain", run_name=run_dir.name, **kw)  # type: ignore[arg-type]


def test_disabled_or_non_writer_ranks_are_no_ops(tmp_path: Path) -> None:
    for tracker in (
        _open(tmp_path / "a", role="none"),
        _open(tmp_path / "b", TrackingConfig(enabled=False)),
    ):
        assert type(tracker) is Tracker and tracker.run_id is None
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_a_bad_tracking_uri_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"tracking.uri='htp://x:5000' is not a tracking URI.*http://host:port"):
        _open(tmp_path / "a", TrackingConfig(uri="htp://x:5000"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI='localhost:5000' is not a tracking URI"):
        _open(tmp_path / "b")


def test_local_store_gets_params_metrics_and_artifacts(runs_root: Path) -> None:
    run_dir = runs_root / "local-a"
    tracker = _open(run_dir)
    assert tracker.run_id is not None  # known right after open
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == tracker.run_id
    for step in range(1, 21):
        tracker.log_metrics({"train/loss": 2.0 / step, "train/img_per_s": 100.0 + step}, step)
    tracker.log_metrics({"eval/top1": 0.25, "eval/loss": 1.5}, 20)
    (run_dir / "config.yaml").write_text("optim:\n  lr: 0.001\n")
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.close()

    summary = find_run(run_dir)
    assert summary.tracking_uri == f"sqlite:///{runs_root}/mlflow.db"
    assert summary.status == "FINISHED" and summary.experiment == "pretrain"
    assert summary.params == {"optim.lr": "0.001", "train.zero_stage": "2"}
    assert summary.tags["slurm.job_id"] == "77"
    assert summary.metrics == {"train/loss": 0.1, "train/img_per_s": 120.0, "eval/top1": 0.25, "eval/loss": 1.5}
    assert metric_history(summary.tracking_uri, summary.run_id, "train/loss") == [(s, 2.0 / s) for s in range(1, 21)]
    assert list_artifacts(summary.tracking_uri, summary.run_id) == ["config.yaml", "plots/metrics.png"]
    assert (runs_root / "mlartifacts" / "pretrain").is_dir()  # beside the store, not under the cwd
    png = run_dir / "plots" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / BUFFER_FILE).exists()


def test_resume_continues_the_run_without_duplicate_steps(runs_root: Path) -> None:
    run_dir = runs_root / "local-resume"
    first = _open(run_dir)
    for step in range(1, 11):
        first.log_metrics({"train/loss": float(step)}, step)
    first.close("KILLED")
    run_id = first.run_id

    # The requeued job restarts from a checkpoint at step 6 and runs to 15 with another LR.
    second = _open(run_dir, run_id=run_id, params={"optim.lr": 0.002, "train.zero_stage": 2})
    assert second.run_id == run_id
    for step in range(7, 16):
        second.log_metrics({"train/loss": 100.0 + step}, step)
    second.close()

    summary = find_run(run_dir)
    assert summary.status == "FINISHED"
    history = metric_history(summary.tracking_uri, run_id, "train/loss")
    assert [s for s, _ in history] == list(range(1, 16))  # each step once
    assert history == [(s, float(s)) for s in range(1, 11)] + [(s, 100.0 + s) for s in range(11, 16)]
    assert summary.params["optim.lr"] == "0.001"  # MLflow params are immutable ...
    assert summary.tags["param_changed.optim.lr"] == "0.001 -> 0.002"  # ... the change is a tag


def test_a_second_job_cannot_write_into_a_tracked_run(runs_root: Path) -> None:
    run_dir = runs_root / "local-lease"
    run_dir.mkdir()
    holder = {"host": "othernode", "pid": 1234, "job_id": "555", "heartbeat": time.time()}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    refused = r"tracked by another job \(SLURM job 555, host othernode.*its own train.run_dir"
    with pytest.raises(RuntimeError, match=refused):
        _open(run_dir)
    holder["heartbeat"] = time.time() - 600  # a lease nobody renews is taken over
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    _open(run_dir).close()


@pytest.fixture
def hanging_server() -> Iterator[str]:
    """A port that accepts TCP connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_hanging_server_never_stalls_training_and_buffer_replays_at_next_start(
    runs_root: Path, hanging_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = runs_root / "hung"
    cfg = TrackingConfig(uri=hanging_server, timeout_s=1.0, max_retries=0, retry_s=0.5, system_metrics=False)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = _open(run_dir, cfg)
        opened = time.monotonic() - t0
        latencies = []
        for step in range(1, 201):
            t = time.perf_counter()
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
            latencies.append(time.perf_counter() - t)
        t = time.monotonic()
        tracker.close(timeout_s=3.0)
        closing = time.monotonic() - t
    assert tracker.run_id is None  # the run could not be created
    assert opened < 3.0, f"open took {opened:.1f} s against a hung server"
    assert sum(latencies) < 1.0 and max(latencies) < 0.05, f"log_metrics: sum {sum(latencies):.3f} s"
    assert closing < 5.0, f"close took {closing:.1f} s"
    warnings = [r for r in caplog.records if "buffered in" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    buffered = [json.loads(line) for line in (run_dir / BUFFER_FILE).read_text().splitlines()]
    assert [r["step"] for r in buffered if r["t"] == "m"] == list(range(1, 201))

    # The next start of this run (here against the local store) creates the run and replays it all.
    replayed = _open(run_dir)
    replayed.log_metrics({"train/loss": 0.001}, 201)
    replayed.log_metrics({"train/loss": 9.9}, 200)  # already recorded: dropped
    replayed.close()
    history = metric_history(find_run(run_dir).tracking_uri, replayed.run_id, "train/loss")
    assert history == [(s, 1.0 / s) for s in range(1, 201)] + [(201, 0.001)]
    assert not (run_dir / BUFFER_FILE).exists()


def test_a_crashed_job_ends_its_run_failed_and_keeps_its_metrics(runs_root: Path) -> None:
    run_dir = runs_root / "crashed"
    script = f"""
from pathlib import Path
from pipeline.config import TrackingConfig
from pipeline.tracking import open_tracker
tracker = open_tracker(TrackingConfig(system_metrics=False), run_dir=Path({str(run_dir)!r}), experiment="pretrain",
                       run_name="crashed")
for step in range(1, 4):
    tracker.log_metrics({{"train/loss": float(step)}}, step)
raise RuntimeError("the training loop crashed")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert out.returncode == 1 and "the training loop crashed" in out.stderr
    summary = find_run(run_dir)
    assert summary.status == "FAILED"
    assert metric_history(summary.tracking_uri, summary.run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not (run_dir / LOCK_FILE).exists()


def test_tracking_config_rejects_bad_retry_interval() -> None:
    with pytest.raises(ConfigError, match=r"tracking.retry_s must be > 0"):
        TrackingConfig(retry_s=0)


def test_zero_counters_stay_out_until_non_zero_and_the_dataset_is_an_input(runs_root: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking.datasets import split_inputs

    run_dir = runs_root / "local-quiet"
    splits = {"train": ("0123456789abcdef", 360), "val": ("fedcba9876543210", 40)}
    inputs = split_inputs(name="digits", source="/data/digits", splits=splits, train_split="train",
                          val_split="val", num_classes=10)  # fmt: skip
    first = _open(run_dir)
    first.log_datasets(inputs)
    for step in range(1, 6):
        skipped = 0.0 if step < 4 else 2.0
        first.log_metrics({"train/loss": 1.0, "data/skipped_corrupt_image": skipped, "data/skipped_missing_cls": 0.0,
                           "train/skipped_steps": 0.0}, step)  # fmt: skip
    first.close("KILLED")
    # A resume logs the same inputs again (one input each, not two) and the counter it restored.
    second = _open(run_dir, run_id=first.run_id)
    second.log_datasets(inputs)
    second.log_metrics({"data/skipped_corrupt_image": 2.0, "data/skipped_missing_cls": 0.0}, 6)
    second.close()

    summary = find_run(run_dir)
    assert metric_history(summary.tracking_uri, summary.run_id, "data/skipped_corrupt_image") == [
        (4, 2.0), (5, 2.0), (6, 2.0)
    ]  # fmt: skip
    assert "data/skipped_missing_cls" not in summary.metrics and "train/skipped_steps" not in summary.metrics
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    got = sorted(
        (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"],
         json.loads(d.dataset.profile)["num_rows"], json.loads(d.dataset.source)["uri"])
        for d in run.inputs.dataset_inputs
    )  # fmt: skip
    assert got == [
        ("digits", "0123456789abcdef", "training", 360, "/data/digits"),
        ("digits", "fedcba9876543210", "evaluation", 40, "/data/digits"),
    ]
    assert json.loads(run.inputs.dataset_inputs[0].dataset.profile)["splits"] == {"train": 360, "val": 40}
    experiment = client.get_experiment(summary.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
