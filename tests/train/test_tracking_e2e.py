"""Training against a real MLflow server on 127.0.0.1: what a run carries, and a server that dies.

The server is killed mid-run: training must keep its speed, finish, and its buffered metrics must
reach the server once it is back (replayed by the next start of the same run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.data import read_index
from pipeline.tracking import RunSummary, counted_history, find_run, metric_history
from pipeline.tracking.read import list_artifacts
from tests.fixtures.mlflow_models import assert_run_model
from tests.train.conftest import SMOKE, assert_ok, metrics, start_training, train, wait_for

STEPS = 120


def overrides(shards: Path, run_dir: Path, uri: str, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=60", f"tracking.uri={uri}", "tracking.timeout_s=1", "tracking.max_retries=0",
        "tracking.retry_s=1", "tracking.system_metrics=false", "optim.lr=0.002", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(660)  # two runs and a replay; 420 s ran out on a loaded 2-core machine
def test_server_killed_mid_run(mlflow_server, synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    register = f"tiny-vit-{tmp_path.name}"  # the end-of-run export, logged while the server is down
    job = start_training(
        2, overrides(synthetic_shards, run_dir, mlflow_server.url, f"tracking.register_as={register}"),
        log=tmp_path / "train.log",
    )  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 20, 240, "20 steps")
        mlflow_server.kill()
        killed_at = max(metrics(run_dir))
        # Trained to the end, but the metrics since the kill never reached the server: not a plain
        # success (rank 0 exits 4, so torchrun fails), the buffer stays for the next start.
        assert job.wait(timeout=240) != 0, (tmp_path / "train.log").read_text()[-5000:]
    finally:
        if not mlflow_server.running():
            mlflow_server.start()
    log = (tmp_path / "train.log").read_text()
    m = metrics(run_dir)
    assert max(m) == STEPS and killed_at < STEPS - 20
    # Normal speed with the server down: the steps after the kill are no slower than before it.
    t = {s: m[s]["time"] for s in m}
    before = (t[killed_at] - t[5]) / (killed_at - 5)
    after = (t[STEPS - 1] - t[killed_at + 5]) / (STEPS - 1 - killed_at - 5)
    assert after < 2.0 * before + 0.02, f"{after * 1e3:.1f} ms/step with the server down vs {before * 1e3:.1f} before"
    assert log.count("metrics are buffered in") == 1  # one warning, not one per call
    assert (run_dir / "tracking_buffer.jsonl").exists()
    assert f"never reached {mlflow_server.url}; they stay in {run_dir / 'tracking_buffer.jsonl'}" in log
    assert "exitcode  : 4" in log

    # The next start of this (complete) run replays the buffer into the same MLflow run.
    # Patient requests for the replay: a loaded machine can take over a second per batch request.
    again = train(
        2, overrides(synthetic_shards, run_dir, mlflow_server.url, "tracking.timeout_s=30",
                     f"tracking.register_as={register}"),
    )  # fmt: skip
    assert_ok(again)
    assert "already complete" in again.stdout
    run = find_run(run_dir)
    assert run.run_id == json.loads((run_dir / "tracking.json").read_text())["run_id"]
    history = metric_history(run.tracking_uri, run.run_id, "train/loss")
    steps = [s for s, _ in history]
    assert steps == list(range(1, STEPS + 1)), "every step arrives exactly once"
    assert [v for _, v in history] == pytest.approx([m[s]["train/loss"] for s in range(1, STEPS + 1)])
    assert run.params["optim.lr"] == "0.002" and run.params["train.zero_stage"] == "2"
    assert run.tags["world_size"] == "2" and run.tags["zero_stage"] == "2"
    assert run.metrics["eval/top1"] >= 0.9
    artifacts = list_artifacts(run.tracking_uri, run.run_id)
    assert "config.yaml" in artifacts and any(a.endswith(".png") for a in artifacts)
    # The model, buffered by the first start and replayed by the second (which finished the same
    # export again): one logged model, loadable by run, predicting the export's logits; one version.
    version = assert_run_model(run.tracking_uri, run.run_id, run_dir / "export", register_as=register)
    assert float(version.tags["eval/top1"]) == pytest.approx(run.metrics["eval/top1"], rel=1e-5)
    assert float(version.tags["eval/loss"]) == pytest.approx(run.metrics["eval/loss"], rel=1e-5)
    assert float(version.tags["best_top1"]) >= float(version.tags["eval/top1"])


@pytest.mark.timeout(420)
def test_after_a_rollback_every_reader_knows_which_value_of_a_step_counts(
    mlflow_server, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "rollback"
    extra = [f"train.steps={20}", "checkpoint.every_steps=5", "train.zero_stage=0", "train.max_nonfinite_steps=3"]
    proc = train(
        2,
        overrides(synthetic_shards, run_dir, mlflow_server.url, *extra),
        env={"PIPELINE_INJECT_NONFINITE": "12,13,14"},
    )
    # Steps 12-14 fail, training rolls back to step 10 and re-runs 11-13; 12-14 fail again: it stops.
    assert proc.returncode != 0 and "steps 12-14 non-finite: rolling back to step_00000010" in proc.stdout
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    local = [(rec["step"], rec["train/loss"]) for rec in lines if "train/loss" in rec]
    assert [s for s, _ in local] == list(range(1, 14))  # the first attempt's 11-13 are gone: one value each

    run = find_run(run_dir)
    history = metric_history(run.tracking_uri, run.run_id, "train/loss")
    assert [s for s, _ in history] == [*range(1, 11), 11, 11, 12, 12, 13, 13]  # MLflow keeps every point ...
    (tag,) = [v for k, v in run.tags.items() if k.startswith("rollback.step10.")]  # ... and says which count
    assert tag.startswith("steps 11-14 re-run from the checkpoint of step 10 at ")
    assert "for these steps the values logged after that time count" in tag
    counted = counted_history(run.tracking_uri, run.run_id, "train/loss")
    assert [s for s, _ in counted] == list(range(1, 14))
    same = [(a == b) or (math.isnan(a) and math.isnan(b)) for (_, a), (_, b) in zip(counted, local, strict=True)]
    assert all(same), (counted, local)  # the values that count in MLflow are the local log's
    first_11 = [v for s, v in history if s == 11]
    assert first_11[0] != first_11[1] and counted[10][1] == local[10][1]  # the re-run's step 11 counts
    assert_run_page_filled(run, lines, synthetic_shards)


def assert_run_page_filled(run: RunSummary, lines: list[dict], shards: Path) -> None:
    """What the MLflow run page shows besides the metrics: the shard index as dataset inputs, Source and
    Created by; the experiment opens as model training; zero counters stay out of the charts."""
    from mlflow import MlflowClient

    client = MlflowClient(run.tracking_uri)
    index = read_index(shards)
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    got = {(d.dataset.name, d.dataset.digest, d.tags[0].value): json.loads(d.dataset.profile) for d in inputs}
    want = {
        (shards.name, index.fingerprint(s), c): index.splits[s].samples
        for s, c in (("train", "training"), ("val", "evaluation"))
    }
    assert {k: v["num_rows"] for k, v in got.items()} == want
    assert json.loads(inputs[0].dataset.source)["uri"] == str(shards.resolve())
    tags = client.get_run(run.run_id).data.tags  # find_run's summary leaves out MLflow's own mlflow.* tags
    assert tags["mlflow.source.name"] == f"python -m pipeline.train --config {SMOKE}"
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.user"]
    assert client.get_experiment(run.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    skipped = {k for rec in lines for k in rec if k.startswith("data/skipped_")}
    assert len(skipped) >= 5 and all(rec[k] == 0 for rec in lines for k in skipped if k in rec)  # zero all run
    assert not skipped & set(run.metrics)  # ... so they are in metrics.jsonl, not in MLflow's charts
