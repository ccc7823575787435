"""The seam between the engine and a training stage (pretraining, fine-tuning, new objectives).

The engine (lifecycle.py, loop.py) owns the ranks, DeepSpeed, data, checkpoints and tracking. A stage
owns what makes its objective: the model's initial weights, the optimizer's parameter groups, the
loss of a batch, what follows an evaluation and the run's extra tags. The engine never imports a
stage; the entry point picks one (``pipeline.stages.stage_for``) and hands it to ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.config import Config
from pipeline.data import MixupCutmix, soft_target_cross_entropy
from pipeline.model import ViT
from pipeline.train.recipe import param_groups

if TYPE_CHECKING:
    from pipeline.train.lifecycle import Run


class Stage(Protocol):
    def init_model(self, model: ViT, *, fresh: bool) -> None:
        """Set the initial weights and frozen parameters. ``fresh``: False when the checkpoint's
        weights follow (frozen parameters must still match the saved optimizer's groups)."""

    def param_groups(self, model: ViT) -> list[dict]:
        """The optimizer's parameter groups (weight decay, per-layer LR scale)."""

    def batch_loss(
        self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
        *, rank: int, step: int, micro: int,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of one micro batch, a scalar; any randomness keyed by (rank, step, micro)."""

    def after_eval(self, r: Run, top1: float) -> None:
        """Called by every rank after each evaluation (collectives allowed)."""

    def tags(self) -> dict[str, str]:
        """Extra tags for the tracking run, asked for after ``init_model``."""


class Classification:
    """Supervised classification from random weights: cross-entropy on mixup/cutmix soft targets."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._mix: MixupCutmix | None = None

    def init_model(self, model: ViT, *, fresh: bool) -> None:
        return None  # the model's own initialisation

    def param_groups(self, model: ViT) -> list[dict]:
        return param_groups(model, weight_decay=self.cfg.optim.weight_decay, layer_decay=self.cfg.finetune.layer_decay)

    def batch_loss(
        self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
        *, rank: int, step: int, micro: int,
    ) -> torch.Tensor:  # fmt: skip
        if self._mix is None or self._mix.rank != rank:
            cfg = self.cfg
            self._mix = MixupCutmix(cfg.data, cfg.model.num_classes, seed=cfg.train.seed, rank=rank)
        images, targets = self._mix(images, labels, step=step, micro=micro)  # draws per (rank, step, micro)
        return soft_target_cross_entropy(model(images).float(), targets)

    def after_eval(self, r: Run, top1: float) -> None:
        return None

    def tags(self) -> dict[str, str]:
        return {}


def pretraining(cfg: Config) -> Classification:
    """The engine's own stage; a config that fine-tunes needs the caller to pass that stage."""
    if cfg.finetune.enabled:
        raise ValueError(
            "finetune.init_from is set but no fine-tuning stage was passed to pipeline.train.run; "
            "pass stage=pipeline.stages.stage_for(cfg) (python -m pipeline.train does)"
        )
    return Classification(cfg)
