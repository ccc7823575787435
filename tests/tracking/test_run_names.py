"""Run and experiment names (tracking/run_names.py): pure functions, no store."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TrackingConfig, load_config
from pipeline.config.schema import Config
from pipeline.tracking import experiment_for, run_name_for


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
    assert experiment_for(cfg) == "pretrain"  # one experiment per config family
