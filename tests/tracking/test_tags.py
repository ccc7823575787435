"""Run tags and the link to the pretraining run (tracking/tags.py): pure functions, no store."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.config.schema import Config
from pipeline.tracking import pretrain_tags, run_tags


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
