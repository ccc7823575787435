"""Mixup / CutMix / label smoothing as a batch transform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.schema import DataConfig
from pipeline.data import MixupCutmix, one_hot, soft_target_cross_entropy


def batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4


def test_off_is_one_hot_with_smoothing_and_matches_cross_entropy():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(label_smoothing=0.1), num_classes=4, seed=0, rank=0)
    out, targets = mix(images, labels, step=0, micro=0)
    assert out is images and not mix.enabled
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert torch.allclose(targets[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    logits = torch.randn(6, 4)
    ref = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_target_cross_entropy(logits, targets), ref, atol=1e-6)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(labels, 4)), F.cross_entropy(logits, labels))


def test_mixup_blends_images_and_targets_with_one_weight():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(mixup_alpha=0.4), num_classes=4, seed=0, rank=0)
    out, targets = mix(images, labels, step=3, micro=0)
    lam = float(targets[0, labels[0]] - (labels[0] == labels[-1]) * 0)  # sample 0 is paired with sample 5
    assert torch.allclose(out, images * lam + images.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(targets, one_hot(labels, 4) * lam + one_hot(labels, 4).flip(0) * (1 - lam))
    again, _ = mix(images, labels, step=3, micro=0)
    assert torch.equal(out, again)  # the draw is a function of the step


def test_cutmix_pastes_a_box_whose_area_sets_the_weight():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(cutmix_alpha=1.0), num_classes=4, seed=0, rank=0)
    for step in range(5):
        out, targets = mix(images, labels, step=step, micro=0)
        pasted = (out != images).any(1)[0]  # (H, W) pixels taken from the partner
        lam = float(targets[0, labels[0]])
        assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_mix_prob_zero_never_mixes():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(mixup_alpha=1.0, mix_prob=0.0), num_classes=4, seed=0, rank=0)
    out, targets = mix(images, labels, step=0, micro=0)
    assert torch.equal(out, images) and torch.equal(targets, one_hot(labels, 4))


RECIPE = DataConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)  # the ViT-B/16 configs' mix


def draw(seed: int, rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch()
    return MixupCutmix(RECIPE, num_classes=4, seed=seed, rank=rank)(images, labels, step=step, micro=micro)


def test_ranks_draw_different_mixes_and_each_key_always_draws_the_same():
    # Weight of sample 0's own class: lambda (1 - box area for CutMix), shifted by the smoothing.
    lam = {(rank, step, micro): float(draw(0, rank, step, micro)[1][0, 0]) for rank in range(4)
           for step in range(3) for micro in range(2)}  # fmt: skip
    for step in range(3):
        for micro in range(2):
            per_rank = [lam[rank, step, micro] for rank in range(4)]
            assert len(set(per_rank)) == 4, f"ranks drew the same mix at step {step}, micro {micro}: {per_rank}"
    assert lam[0, 1, 0] != lam[0, 1, 1] and lam[0, 1, 0] != lam[0, 2, 0]  # micro-steps and steps differ
    # A fresh object (a resumed run) reproduces any key exactly, whatever was drawn before it.
    out, targets = draw(0, 1, 2, 1)
    again, again_targets = draw(0, 1, 2, 1)
    assert torch.equal(out, again) and torch.equal(targets, again_targets)
    assert float(targets[0, 0]) == lam[1, 2, 1]
    assert float(draw(1, 1, 2, 1)[1][0, 0]) != lam[1, 2, 1]  # another train.seed, another draw
