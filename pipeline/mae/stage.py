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
from pipeline.data import SKIPPED, ValLoader, build_val_loader, read_index
from pipeline.data.plan import rng
from pipeline.mae.monitor import knn_predict, reconstruction_grid, save_png
from pipeline.model.mae import MAEOutput, MaskedAutoencoder
from pipeline.model.presets import pair
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
        self._no_knn: str | None = None  # why the k-NN monitor is off ("": on); None: not asked yet
        self._bank_loader: ValLoader | None = None

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
        and batch), so the curve moves with the model only; the k-NN top-1 when the data has labels;
        and, on rank 0, the reconstruction picture of the first val images, uploaded at every eval."""
        assert r.val_loader is not None
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
        for batch, (images, labels) in enumerate(r.val_loader):
            g = mask_generator(self.cfg.train.seed, r.env.rank, batch, _TAG_EVAL_MASK)
            out = r.engine(images.to(r.device, r.dtype), generator=g)
            kept = labels != SKIPPED  # padding entries keep the ranks' batch counts equal
            real = kept.to(out.per_sample.device)
            sums += torch.tensor([float(out.per_sample[real].sum()), float(real.sum())], dtype=torch.float64)
            if batch == 0 and r.env.rank == 0:
                self._picture(r, images[kept], out.pred[real], out.mask[real])
        dist.all_reduce(sums)
        loss = float(sums[0] / sums[1].clamp(min=1))
        log.info("eval at step %d: masked-patch loss %.4f on %d images", r.state.step, loss, int(sums[1]))
        metrics = {mn.EVAL_LOSS: loss}
        top1 = self._knn_top1(r)
        if top1 is not None:
            metrics[mn.EVAL_KNN_TOP1] = top1
        return metrics

    def _picture(self, r: Run, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        n = min(self.cfg.mae.recon_images, len(images))
        if n == 0:
            return
        grid = reconstruction_grid(
            images[:n], pred[:n], mask[:n], patch_size=pair(self.cfg.model.patch_size),
            norm_pix_loss=self.cfg.mae.norm_pix_loss, mean=self.cfg.data.mean, std=self.cfg.data.std,
        )  # fmt: skip
        path = save_png(grid, r.run_dir / "reconstructions" / f"step_{r.state.step:08d}.png")
        r.tracker.log_artifact(path, "reconstructions")

    def _knn_top1(self, r: Run) -> float | None:
        """Collective: DINO's weighted k-NN top-1 of the val split against the train bank (None: skipped)."""
        mae = self.cfg.mae
        if self._no_knn is None:
            self._no_knn = _knn_skip_reason(self.cfg)
            if self._no_knn:
                log.info("k-NN monitor skipped: %s", self._no_knn)
        if self._no_knn:
            return None
        if self._bank_loader is None:
            self._bank_loader = build_val_loader(
                self.cfg.data, rank=r.env.rank, world_size=r.env.world_size, batch_size=r.plan.micro_batch_size,
                image_size=pair(self.cfg.model.image_size), split=self.cfg.data.train_split, subset=mae.knn_bank,
                seed=self.cfg.train.seed,
            )  # fmt: skip
        bank, bank_labels = _gather(*self._features(r, self._bank_loader))
        bank, bank_labels = bank[bank_labels >= 0], bank_labels[bank_labels >= 0]
        query, labels = self._features(r, r.val_loader)
        keep = labels >= 0
        predicted = knn_predict(query[keep], bank, bank_labels, k=mae.knn_k, temperature=mae.knn_temperature,
                                num_classes=self.cfg.model.num_classes)  # fmt: skip
        counts = torch.tensor([float((predicted == labels[keep]).sum()), float(keep.sum())], dtype=torch.float64)
        dist.all_reduce(counts)
        top1 = float(counts[0] / counts[1].clamp(min=1))
        log.info("eval at step %d: k-NN top-1 %.4f (k=%d, bank %d images)", r.state.step, top1, mae.knn_k, len(bank))
        return top1

    def _features(self, r: Run, loader: ValLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) encoder features of every image this rank reads, padding included, and (M,) labels."""
        feats, labels = [], []
        for images, batch_labels in loader:
            feats.append(r.engine(images.to(r.device, r.dtype), features=True).float())
            labels.append(batch_labels.to(r.device))
        return torch.cat(feats), torch.cat(labels)

    def after_eval(self, r: Run, metrics: dict[str, float]) -> None:
        return None

    def tags(self) -> dict[str, str]:
        return {"objective": "mae"}


def _knn_skip_reason(cfg: Config) -> str:
    """Why the k-NN monitor cannot run on this config ("" when it can)."""
    if cfg.mae.knn_bank == 0:
        return "mae.knn_bank=0"
    if read_index(cfg.data.path).label.kind == "none":
        return f"{cfg.data.path} has no labels (indexed --unlabeled), and k-NN top-1 needs them"
    return ""


def _gather(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, in rank order (the loaders give every rank as many rows, padding included)."""
    world = dist.get_world_size()
    out_f, out_l = [torch.empty_like(feats) for _ in range(world)], [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(out_f, feats)
    dist.all_gather(out_l, labels)
    return torch.cat(out_f), torch.cat(out_l)
