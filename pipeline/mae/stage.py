"""MAE pretraining as a stage of the engine (pipeline.train.stage): the ViT plus its decoder is the
model the engine trains and checkpoints; the loss is the masked-patch reconstruction error, with
each mask drawn from a generator keyed by batch identity, so a resumed run draws the same masks."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from pipeline import metric_names as mn
from pipeline.config import Config
from pipeline.data.plan import rng
from pipeline.model.mae import MAEOutput, MaskedAutoencoder
from pipeline.model.vit import ViT
from pipeline.train.lifecycle import Run
from pipeline.train.recipe import param_groups

log = logging.getLogger(__name__)

_TAG_MASK, _TAG_EVAL_MASK = 0x3A5E, 0x3A5F  # keep the mask draws apart from the loader's and mixup's


def mask_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *key): the same masks on any device and after any resume."""
    return torch.Generator().manual_seed(int(rng(seed, *key).integers(2**63)))


class MAEPretraining:
    """Masked-autoencoder pretraining; labels are not read by the loss."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build_model(self) -> ViT:
        return MaskedAutoencoder(**self.cfg.model.vit_kwargs(), **self.cfg.mae.model_kwargs())

    def init_model(self, model: ViT, *, fresh: bool) -> None:
        # The head is built (model.num_classes names it, so the export stays a whole ViT) but MAE never
        # uses it: frozen, it takes no optimizer state and no weight decay; fine-tuning replaces it.
        model.head.requires_grad_(False)

    def param_groups(self, model: ViT) -> list[dict]:
        return param_groups(model, weight_decay=self.cfg.optim.weight_decay)

    def batch_loss(
        self, model: Callable[..., MAEOutput], images: torch.Tensor, labels: torch.Tensor,
        *, rank: int, step: int, micro: int,
    ) -> torch.Tensor:  # fmt: skip
        return model(images, generator=mask_generator(self.cfg.train.seed, rank, step, micro, _TAG_MASK)).loss

    def evaluate(self, r: Run) -> dict[str, float]:
        """Masked-patch MSE over the val split, with the same masks at every evaluation (keyed by rank
        and batch), so the curve moves with the model only."""
        assert r.val_loader is not None
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
        for batch, (images, labels) in enumerate(r.val_loader):
            g = mask_generator(self.cfg.train.seed, r.env.rank, batch, _TAG_EVAL_MASK)
            out = r.engine(images.to(r.device, r.dtype), generator=g)
            real = (labels >= 0).to(out.per_sample.device)  # padding entries keep the ranks' batch counts equal
            sums += torch.tensor([float(out.per_sample[real].sum()), float(real.sum())], dtype=torch.float64)
        dist.all_reduce(sums)
        loss = float(sums[0] / sums[1].clamp(min=1))
        log.info("eval at step %d: masked-patch loss %.4f on %d images", r.state.step, loss, int(sums[1]))
        return {mn.EVAL_LOSS: loss}

    def after_eval(self, r: Run, metrics: dict[str, float]) -> None:
        return None

    def tags(self) -> dict[str, str]:
        return {"objective": "mae"}
