"""Run names, URIs, tags, UI links and request planning: pure functions, no store."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrackingConfig, load_config
from pipeline.config.schema import Config
from pipeline.tracking import default_tracking_uri, pretrain_tags, run_name_for, run_tags, ui_compare_url, ui_runs_url
from pipeline.tracking.backend import MAX_METRICS, MAX_PARAMS_TAGS, plan_requests
from pipeline.tracking.read import RunSummary, compare_rows, format_table


def test_run_name_from_config_name_and_recipe_overrides() -> None:
    cfg = Config(name="vit_b16")
    overrides = ["optim.lr=3e-4", "train.zero_stage=2", "train.run_dir=/scratch/x", "tracking.uri=http://h:5000"]
    assert run_name_for(cfg, overrides) == "vit_b16-lr3e-4-zero2"
    assert run_name_for(cfg, ["launch.nodes=4", "launch.partition=gpu", "optim.weight_decay=0.1"]) == "vit_b16-n4-wd0.1"
    assert run_name_for(cfg, ["model.preset=B/16", "data.label_smoothing=0.1"]) == "vit_b16-B16-ls0.1"
    assert run_name_for(cfg, []) == "vit_b16"


def test_run_name_from_config_wins() -> None:
    cfg = Config(name="vit_b16", tracking=TrackingConfig(run_name="my-run"))
    assert run_name_for(cfg, ["optim.lr=1e-3"]) == "my-run"


def test_run_name_of_a_loaded_config(tmp_path: Path) -> None:
    path = tmp_path / "pretrain" / "vit_s16.yaml"
    path.parent.mkdir()
    path.write_text("optim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=5e-4", "train.zero_stage=3"])
    assert run_name_for(cfg, ["optim.lr=5e-4", "train.zero_stage=3"]) == "vit_s16-lr5e-4-zero3"
    assert cfg.tracking.experiment == "pretrain"  # one experiment per config family


def test_default_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "a"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(TrackingConfig(), run_dir) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri(TrackingConfig(), run_dir) == "http://127.0.0.1:5999"
    assert default_tracking_uri(TrackingConfig(uri="http://127.0.0.1:6000"), run_dir) == "http://127.0.0.1:6000"


def test_tracking_config_rejects_bad_retry_interval() -> None:
    with pytest.raises(ConfigError, match=r"tracking.retry_s must be > 0"):
        TrackingConfig(retry_s=0)


def test_run_tags_carry_slurm_and_recipe() -> None:
    cfg = Config(name="vit_b16", tracking=TrackingConfig(tags={"owner": "vision"}))
    # The node count comes from the caller's distributed environment, not from SLURM's variables.
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "3"}
    tags = run_tags(cfg, world_size=16, num_nodes=2, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert tags["slurm.job_id"] == "4242"
    assert tags["slurm.nodelist"] == "node[1-2]"
    assert tags["slurm.nodes"] == "2"
    assert tags["nodes"] == "2"
    assert tags["slurm.restart_count"] == "1"
    assert tags["world_size"] == "16"
    assert tags["zero_stage"] == str(cfg.train.zero_stage)
    assert tags["owner"] == "vision"
    assert len(tags["git.commit"]) == 40  # the tests run from a git checkout


def test_pretrain_tags_found_from_a_checkpoint_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "pre"
    (run_dir / "checkpoints" / "step_100").mkdir(parents=True)
    state = {"run_id": "a" * 32, "run_name": "vit_s16-lr1e-3", "experiment_id": "3"}
    (run_dir / "tracking.json").write_text(json.dumps(state))
    tags = pretrain_tags(run_dir / "checkpoints" / "step_100")
    assert tags["pretrain.run_id"] == "a" * 32
    assert tags["pretrain.run_name"] == "vit_s16-lr1e-3"
    assert tags["pretrain.experiment_id"] == "3"
    assert tags["pretrain.checkpoint"].endswith("checkpoints/step_100")
    assert pretrain_tags(tmp_path / "elsewhere") == {"pretrain.checkpoint": str(tmp_path / "elsewhere")}


def test_ui_urls() -> None:
    url = ui_compare_url("http://localhost:5000/", ["r1", "r2"], ["7", "7"])
    assert url.startswith("http://localhost:5000/#/compare-runs?runs=")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ["r1", "r2"]
    assert json.loads(query["experiments"][0]) == ["7"]
    assert ui_runs_url("http://h:1", "7") == "http://h:1/#/experiments/7/runs"


def test_plan_requests_respects_mlflow_batch_limits_and_order() -> None:
    metrics = [{"t": "m", "step": s, "ts": 0, "v": {f"k{i}": 1.0 for i in range(300)}} for s in range(5)]
    params = {"t": "p", "v": {f"p{i}": "x" for i in range(250)}}
    artifact = {"t": "a", "path": "/x", "dir": None}
    groups = plan_requests([*metrics[:2], params, artifact, *metrics[2:]])
    flat = [r for g in groups for r in g]
    assert [r["t"] for r in flat] == ["m", "m", "p", "p", "p", "a", "m", "m", "m"]
    for g in groups:
        assert sum(len(r["v"]) for r in g if r["t"] == "m") <= MAX_METRICS
        assert sum(len(r["v"]) for r in g if r["t"] == "p") <= MAX_PARAMS_TAGS
        assert sum(len(r.get("v", {})) for r in g) <= MAX_METRICS
    assert sum(len(r["v"]) for r in flat if r["t"] == "p") == 250
    assert [len(g) for g in groups if g[0]["t"] == "m"] == [2, 3]  # 600 and 900 metrics per request


def test_compare_rows_show_only_differences_by_default() -> None:
    def run(name: str, lr: str, top1: float) -> RunSummary:
        params = {"optim.lr": lr, "train.zero_stage": "2", "tracking.uri": name}
        return RunSummary(name * 4, name, "1", "pretrain", "FINISHED", "u", params, {"eval/top1": top1})

    rows = dict(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)]))
    assert rows["optim.lr"] == ["0.001", "0.0003"]
    assert rows["eval/top1"] == ["0.5", "0.625"]
    assert "train.zero_stage" not in rows and "tracking.uri" not in rows
    all_rows = dict(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)], all_params=True))
    assert all_rows["train.zero_stage"] == ["2", "2"]
    table = format_table(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)]))
    assert table.splitlines()[0].split() == ["run", "a", "b"]
