"""The stage seam and the typed trainer state (no DeepSpeed, no ranks)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import MixupCutmix, soft_target_cross_entropy
from pipeline.stages import stage_for
from pipeline.train.lifecycle import TrainerState
from pipeline.train.stage import Classification, pretraining

# A trainer_state.json as the engine wrote it before TrainerState existed (a fine-tune run, with one
# key this version does not know): resuming from it must write it back unchanged.
OLD_STATE = {
    "step": 20, "samples_seen": 640, "skipped_steps": 1, "run_id": "a" * 32, "best_top1": 0.5,
    "schedule": {"total_samples": 960, "warmup_samples": 64, "peak_lr": 0.001, "min_lr": 1e-05, "kind": "cosine",
                 "anchor_samples": 0, "anchor_progress": 0.0},
    "loader": {"epoch": 1, "position": 3}, "config": {"name": "x"}, "from_a_later_version": [1, 2],
}  # fmt: skip


def test_an_old_trainer_state_round_trips_unchanged() -> None:
    state = TrainerState.from_dict(json.loads(json.dumps(OLD_STATE)))
    assert (state.step, state.samples_seen, state.skipped_steps, state.best_top1) == (20, 640, 1, 0.5)
    assert state.schedule.total_samples == 960
    assert state.to_dict(loader=OLD_STATE["loader"], config=OLD_STATE["config"]) == OLD_STATE


def test_a_fresh_state_writes_the_keys_it_always_wrote() -> None:
    state = TrainerState.from_dict({**OLD_STATE, "best_top1": None})
    state.best_top1 = None
    written = state.to_dict(loader={}, config={})
    assert "best_top1" not in written  # absent until the first evaluation of a fine-tune, as before
    assert set(written) == {"step", "samples_seen", "skipped_steps", "schedule", "run_id", "loader", "config",
                            "from_a_later_version"}  # fmt: skip


def test_the_config_picks_the_stage(tmp_path) -> None:
    pre = load_config(None, [])
    ft = load_config(None, [f"finetune.init_from={tmp_path}", "finetune.num_classes=3"])
    assert type(stage_for(pre)) is Classification
    assert type(stage_for(ft)).__name__ == "FineTune"
    with pytest.raises(ValueError, match="no fine-tuning stage was passed"):
        pretraining(ft)  # the engine's default never fine-tunes by accident


def test_classification_loss_is_mixed_soft_target_cross_entropy() -> None:
    cfg = load_config(None, ["data.mixup_alpha=0.8", "data.mix_prob=1.0", "model.num_classes=4"])
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    images, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    loss = Classification(cfg).batch_loss(head, images, labels, rank=1, step=7, micro=2)
    mixed, targets = MixupCutmix(cfg.data, 4, seed=cfg.train.seed, rank=1)(images, labels, step=7, micro=2)
    assert not torch.equal(mixed, images)  # the mix ran
    assert loss.item() == soft_target_cross_entropy(head(mixed).float(), targets).item()
