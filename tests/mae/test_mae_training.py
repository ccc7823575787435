"""MAE pretraining through the real entry point: 2 CPU ranks (torchrun, gloo), DeepSpeed ZeRO-2, real shards.

The objective test of issue 18: the masked-patch MSE on the val split falls well below the trivial
predictor's (zeros for per-patch normalised pixels: the mean squared target, (n - 1)/n ~ 0.98 here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.data import build_val_loader
from pipeline.model import ViT
from pipeline.model.convert import OUR_LAYOUT_MARKER
from pipeline.model.mae import MaskedAutoencoder
from tests.train.conftest import SMOKE, assert_ok, losses, metrics, train

STEPS = 60  # ~12 s of training on 2 CPU ranks (batch 32, lr 3e-3); the rest is start-up
TINY_MAE = ["train.objective=mae", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=4"]


def trivial_loss(shards: Path) -> float:
    """The val loss of predicting zeros: the mean squared normalised target over every val patch."""
    cfg = load_config(SMOKE, [f"data.path={shards}", "data.num_workers=0", *TINY_MAE])
    model = MaskedAutoencoder(**cfg.model.vit_kwargs(), **cfg.mae.model_kwargs())
    total, count = 0.0, 0
    for images, labels in build_val_loader(cfg.data, rank=0, world_size=1, batch_size=64, image_size=(32, 32)):
        target = model.target(images[labels >= 0])  # (B, N, p*p*C)
        total, count = total + float(target.pow(2).mean(-1).sum()), count + target.shape[0] * target.shape[1]
    return total / count


@pytest.mark.timeout(300)
def test_mae_pretraining_reconstructs_masked_patches(synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "mae"
    proc = train(2, [
        f"data.path={synthetic_shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=5",
        "train.zero_stage=2", "checkpoint.every_steps=0", "tracking.enabled=false", "optim.lr=3e-3", *TINY_MAE,
    ])  # fmt: skip
    assert_ok(proc)
    trivial = trivial_loss(synthetic_shards)
    assert 0.95 < trivial < 1.0
    loss = losses(run_dir)
    first, last = loss[5], loss[STEPS]
    val = metrics(run_dir)[STEPS]["eval/loss"]
    print(f"trivial {trivial:.4f}; train loss step 5 {first:.4f} -> step {STEPS} {last:.4f}; val {val:.4f}")
    assert first > 0.9 * trivial  # starts at the trivial predictor
    assert last < 0.75 * trivial and val < 0.75 * trivial, f"train {last:.3f}, val {val:.3f}, trivial {trivial:.3f}"
    assert "eval/top1" not in metrics(run_dir)[STEPS]  # no classifier to score

    # The export is the ViT's state dict (same names and shapes) plus the decoder's.
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    exported.pop(OUR_LAYOUT_MARKER)
    vit = ViT(**load_config(SMOKE, []).model.vit_kwargs()).state_dict()
    assert {k: v.shape for k, v in exported.items() if not k.startswith("decoder.")} == {
        k: v.shape for k, v in vit.items()
    }
    assert any(k.startswith("decoder.blocks.0.") for k in exported)
    assert torch.equal(exported["head.bias"], torch.zeros(10))  # never trained: the head is frozen
