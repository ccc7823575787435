"""The seam between the engine and a training stage (pretraining, fine-tuning, new objectives).

The engine (lifecycle.py, loop.py) owns the ranks, DeepSpeed, data, checkpoints and tracking. A stage
owns what makes its objective: the model it trains and its initial weights, the optimizer's
parameter groups, the loss of a batch, the evaluation's metrics, what follows an evaluation and
the run's extra tags. The engine never imports a stage; the entry point picks one
(``pipeline.stages.stage_for``) and hands it to ``run``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from pipeline import metric_names as mn
from pipeline.config import Config
from pipeline.data import MixupCutmix, soft_target_cross_entropy
from pipeline.model import ViT
from pipeline.train.recipe import param_groups

if TYPE_CHECKING:
    from pipeline.train.lifecycle import Run

log = logging.getLogger(__name__)


class Stage(Protocol):
    def build_model(self) -> ViT:
        """The model the engine trains and checkpoints: every parameter the objective needs (a ViT,
        or a ViT subclass that adds its own parts, such as MAE's decoder)."""

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

    def evaluate(self, r: Run) -> dict[str, float]:
        """Collective: the metrics of ``r.val_loader`` over every rank's share (the model is in
        eval mode, no grad), the same on every rank; the engine records them."""

    def after_eval(self, r: Run, metrics: dict[str, float]) -> None:
        """Called by every rank after each evaluation with its metrics (collectives allowed)."""

    def tags(self) -> dict[str, str]:
        """Extra tags for the tracking run, asked for after ``init_model``."""


class Classification:
    """Supervised classification from random weights: cross-entropy on mixup/cutmix soft targets."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._mix: MixupCutmix | None = None

    def build_model(self) -> ViT:
        return ViT(**self.cfg.model.vit_kwargs())

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

    def evaluate(self, r: Run) -> dict[str, float]:
        """Top-1/top-5 and cross-entropy over the whole val split; every rank runs the same number of batches."""
        assert r.val_loader is not None
        counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, loss sum, samples
        for images, labels in r.val_loader:
            logits = r.engine(images.to(r.device, r.dtype)).float().cpu()
            valid = labels >= 0  # padding entries (label -1) keep the ranks' batch counts equal
            logits, labels = logits[valid], labels[valid]
            hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") if len(labels) else 0.0
            counts += torch.tensor([hit[:, 0].sum(), hit.any(-1).sum(), float(loss), len(labels)], dtype=torch.float64)
        dist.all_reduce(counts)
        top1, top5, loss = (counts[:3] / counts[3].clamp(min=1)).tolist()
        log.info(
            "eval at step %d: top-1 %.4f, top-5 %.4f, loss %.4f on %d images",
            r.state.step, top1, top5, loss, int(counts[3]),
        )  # fmt: skip
        return {mn.EVAL_TOP1: top1, mn.EVAL_TOP5: top5, mn.EVAL_LOSS: loss}

    def after_eval(self, r: Run, metrics: dict[str, float]) -> None:
        return None

    def tags(self) -> dict[str, str]:
        return {}


def pretraining(cfg: Config) -> Classification:
    """The engine's own stage; a config that fine-tunes needs the caller to pass that stage."""
    if cfg.train.objective != "classify":
        raise ValueError(
            f"train.objective={cfg.train.objective} but no stage for it was passed to pipeline.train.run; "
            "pass stage=pipeline.stages.stage_for(cfg) (python -m pipeline.train does)"
        )
    if cfg.finetune.enabled:
        raise ValueError(
            "finetune.init_from is set but no fine-tuning stage was passed to pipeline.train.run; "
            "pass stage=pipeline.stages.stage_for(cfg) (python -m pipeline.train does)"
        )
    return Classification(cfg)
