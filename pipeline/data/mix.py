"""Mixup / CutMix / label smoothing as a batch transform applied in the train step.

Off by default (``data.mixup_alpha = data.cutmix_alpha = 0``): the transform then only turns labels
into (smoothed) one-hot targets. With both alphas > 0 each batch uses CutMix or Mixup with
probability 1/2, as timm's ``Mixup`` does (switch_prob 0.5, batch mode). Mixup: Zhang et al. 2018;
CutMix: Yun et al. 2019, with the mixing weight corrected to the clipped box's area.

Every draw (mix or not, which of the two, lambda, box) comes from a generator seeded by
(seed, rank, step, micro-step): ranks mix differently from each other, and a resumed run mixes
exactly as the uninterrupted one did, with no generator state to checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.schema import DataConfig
from pipeline.data.plan import rng

_TAG_MIX = 0x313C  # keeps these draws apart from the loader's, which share the seed


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, K) targets with ``smoothing / K`` off target and the rest on it."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k t_k log softmax(logits)_k``; equals F.cross_entropy for one-hot t."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class MixupCutmix:
    """``mix(images, labels, step=, micro=) -> (images, soft_targets)``; draws keyed by (seed, rank, step, micro)."""

    def __init__(self, cfg: DataConfig, num_classes: int, *, seed: int, rank: int) -> None:
        self.mixup_alpha, self.cutmix_alpha = cfg.mixup_alpha, cfg.cutmix_alpha
        self.prob, self.smoothing = cfg.mix_prob, cfg.label_smoothing
        self.num_classes, self.seed, self.rank = num_classes, seed, rank

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, step: int, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W), labels (B,) -> mixed images, targets (B, K) whose rows sum to 1.

        ``step`` is the optimizer step (0-based) and ``micro`` the micro-batch within it: the same
        (seed, rank, step, micro) always mixes the same way.
        """
        targets = one_hot(labels, self.num_classes, self.smoothing)
        if not self.enabled:
            return images, targets
        g = rng(self.seed, self.rank, step, micro, _TAG_MIX)
        if g.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or g.random() < 0.5)
        lam = float(g.beta(*(2 * [self.cutmix_alpha if use_cutmix else self.mixup_alpha])))
        partner = images.flip(0)  # pair sample i with B-1-i (timm's batch mode)
        if use_cutmix:
            images, lam = self._cutmix(images, partner, lam, g)
        else:
            images = images * lam + partner * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)

    @staticmethod
    def _cutmix(
        images: torch.Tensor, partner: torch.Tensor, lam: float, g: np.random.Generator
    ) -> tuple[torch.Tensor, float]:
        H, W = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)  # the box covers (1 - lam) of the image before clipping
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(g.integers(H)), int(g.integers(W))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, H)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, W)
        out = images.clone()
        out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        return out, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
