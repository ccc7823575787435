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
    mix = MixupCutmix(DataConfig(label_smoothing=0.1), num_classes=4)
    out, targets = mix(images, labels)
    assert out is images and not mix.enabled
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert torch.allclose(targets[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    logits = torch.randn(6, 4)
    ref = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_target_cross_entropy(logits, targets), ref, atol=1e-6)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(labels, 4)), F.cross_entropy(logits, labels))


def test_mixup_blends_images_and_targets_with_one_weight():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(mixup_alpha=0.4), num_classes=4)
    out, targets = mix(images, labels, step=3)
    lam = float(targets[0, labels[0]] - (labels[0] == labels[-1]) * 0)  # sample 0 is paired with sample 5
    assert torch.allclose(out, images * lam + images.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(targets, one_hot(labels, 4) * lam + one_hot(labels, 4).flip(0) * (1 - lam))
    again, _ = mix(images, labels, step=3)
    assert torch.equal(out, again)  # the draw is a function of the step


def test_cutmix_pastes_a_box_whose_area_sets_the_weight():
    images, labels = batch()
    mix = MixupCutmix(DataConfig(cutmix_alpha=1.0), num_classes=4)
    for step in range(5):
        out, targets = mix(images, labels, step=step)
        pasted = (out != images).any(1)[0]  # (H, W) pixels taken from the partner
        lam = float(targets[0, labels[0]])
        assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_mix_prob_zero_never_mixes():
    images, labels = batch()
    out, targets = MixupCutmix(DataConfig(mixup_alpha=1.0, mix_prob=0.0), num_classes=4)(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, one_hot(labels, 4))
