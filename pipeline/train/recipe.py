"""The optimisation recipe: parameter groups and the learning-rate schedule.

The schedule is a function of *samples seen*, not steps, so a run resumed at another node count
(another global batch) stays on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from pipeline.config import OptimConfig

# Embeddings and normalisation parameters are not decayed (ViT/DeiT/MAE practice).
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "pos_embedding")


@dataclass(frozen=True)
class Schedule:
    """Learning-rate curve over samples seen; stored in checkpoints so resumes keep it.

    After a re-stretch (a resume that changed train.steps) the decay runs from ``anchor_samples``,
    where it had reached ``anchor_progress``, to the new ``total_samples``.
    """

    total_samples: int
    warmup_samples: int
    peak_lr: float
    min_lr: float
    kind: str
    anchor_samples: int = 0
    anchor_progress: float = 0.0

    def progress(self, samples_seen: int) -> float:
        """How far the decay has gone, 0 (peak, end of warmup) to 1 (min_lr); linear in samples seen."""
        if self.anchor_samples > self.warmup_samples and samples_seen < self.anchor_samples:
            # before a re-stretch: the line it was on (the original curve, for a run stretched once)
            return (
                self.anchor_progress
                * max(0, samples_seen - self.warmup_samples)
                / (self.anchor_samples - self.warmup_samples)
            )
        start, done = max(self.anchor_samples, self.warmup_samples), self.anchor_progress
        span = max(1, self.total_samples - start)
        return done + (1.0 - done) * min(1.0, max(0, samples_seen - start) / span)

    def stretch(self, samples_seen: int, total_samples: int) -> Schedule:
        """The same curve up to ``samples_seen``, then the remaining decay spread to ``total_samples``.

        The learning rate is continuous (no jump when a run is extended or shortened) and reaches
        min_lr at the new end; a stretch inside warmup only moves the end of the decay.
        """
        anchor = max(samples_seen, self.warmup_samples)
        return replace(self, total_samples=total_samples, anchor_samples=anchor, anchor_progress=self.progress(anchor))

    def lr(self, samples_seen: int) -> float:
        if samples_seen < self.warmup_samples:
            return self.peak_lr * (samples_seen + 1) / self.warmup_samples
        if self.kind == "constant":
            return self.peak_lr
        progress = self.progress(samples_seen)
        if self.kind == "linear":
            return self.min_lr + (self.peak_lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def make_schedule(optim: OptimConfig, *, steps: int, global_batch_size: int) -> Schedule:
    return Schedule(
        total_samples=steps * global_batch_size,
        warmup_samples=optim.warmup_steps * global_batch_size,
        peak_lr=optim.lr,
        min_lr=optim.min_lr,
        kind=optim.schedule,
    )


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and not any(n in name for n in _NO_DECAY_NAMES)


def param_groups(model: torch.nn.Module, *, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on biases/norms/embeddings; ``lr_scale`` per block for layer decay.

    With ``layer_decay`` < 1, block i's learning rate is scaled by decay ** (depth + 1 - layer_id)
    (BEiT, arXiv:2106.08254; MAE fine-tuning). Frozen parameters (requires_grad=False) are left out.
    """
    num_layers = getattr(model, "num_blocks", 0) + 1
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = model.layer_id(name) if layer_decay < 1.0 else num_layers
        decay = _decays(name, param)
        key = (decay, layer)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - layer),
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def set_lr(groups: list[dict], lr: float) -> None:
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
