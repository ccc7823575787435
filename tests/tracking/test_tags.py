"""Run tags and the link to the pretraining run (tracking/tags.py): pure functions, no store."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.config.schema import Config
from pipeline.tracking import pretrain_tags, run_tags
from pipeline.tracking.tags import source_name


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


def test_run_tags_fill_the_ui_source_and_created_by() -> None:
    env = {"USER": "ada", "PIPELINE_SOURCE": "launch/submit.py --config configs/pretrain/vit_b16.yaml"}
    tags = run_tags(Config(name="vit_b16"), world_size=8, num_nodes=1, env=env)
    assert tags["mlflow.source.name"] == "launch/submit.py --config configs/pretrain/vit_b16.yaml"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.user"] == "ada"
    plain = run_tags(Config(name="x"), world_size=1, num_nodes=1, env={"LOGNAME": "bob"})
    assert plain["mlflow.source.name"] == "python -m pipeline.train" and plain["mlflow.user"] == "bob"
    assert (
        source_name("python -m pipeline.train", "configs/smoke.yaml")
        == "python -m pipeline.train --config configs/smoke.yaml"
    )
    assert source_name("python -m pipeline.train", None) == "python -m pipeline.train"


def test_pretrain_tags_name_the_step_dir_loaded_and_link_the_run_in_the_description(tmp_path: Path) -> None:
    run_dir = tmp_path / "pre"
    step_dir = run_dir / "checkpoints" / "step_00000010"
    step_dir.mkdir(parents=True)
    state = {"run_id": "b" * 32, "run_name": "vit_tiny-lr1e-3", "experiment_id": "7"}
    (run_dir / "tracking.json").write_text(json.dumps(state))
    # finetune.init_from names the run dir; its newest step dir is what was loaded.
    tags = pretrain_tags(run_dir, loaded=step_dir, step=10)
    assert tags["pretrain.checkpoint"] == tags["pretrain.step_dir"] == str(step_dir)
    assert tags["pretrain.step"] == "10"
    note = tags["mlflow.note.content"]
    assert f"[vit_tiny-lr1e-3](#/experiments/7/runs/{'b' * 32}?workflowType=machine_learning)" in note
    assert f"`{step_dir}` (step 10)" in note
    # An export is no step dir: named as the checkpoint loaded, no step_dir tag.
    export = pretrain_tags(run_dir, loaded=run_dir / "export", step=10)
    assert export["pretrain.checkpoint"] == str(run_dir / "export") and "pretrain.step_dir" not in export
    # Untracked pretraining: the path is kept, no link.
    untracked = pretrain_tags(tmp_path / "elsewhere", loaded=tmp_path / "elsewhere" / "step_5", step=5)
    assert "mlflow.note.content" not in untracked and "pretrain.run_id" not in untracked
