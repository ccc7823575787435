"""The MAE monitors: DINO's weighted k-NN vote, the reconstruction picture, and the k-NN skipped on unlabeled data."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.mae.monitor import GAP, knn_predict, reconstruction_grid
from pipeline.mae.stage import MAEPretraining
from pipeline.model.mae import MaskedAutoencoder
from tests.train.conftest import REPO

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_knn_votes_by_exp_similarity_over_the_k_nearest() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[5.0, 0.5], [0.1, 3.0]])  # scale does not matter: cosine similarity
    assert knn_predict(query, bank, labels, k=2, temperature=0.07, num_classes=3).tolist() == [0, 1]
    # k=5: class 1 has three voters but class 0's two are far closer; exp(sim / 0.07) lets them win.
    near0 = torch.tensor([[1.0, 0.05]])
    assert knn_predict(near0, bank, labels, k=5, temperature=0.07, num_classes=3).tolist() == [0]
    # With a high temperature every vote weighs about the same: the majority wins.
    assert knn_predict(near0, bank, labels, k=5, temperature=100.0, num_classes=3).tolist() == [1]


def test_reconstruction_grid_shows_images_masks_and_reconstructions() -> None:
    torch.manual_seed(0)
    model = MaskedAutoencoder(image_size=32, patch_size=8, num_classes=10, dim=48, depth=1, heads=3, mlp_dim=96,
                              dim_head=16, decoder_dim=32, decoder_depth=1, decoder_heads=4)  # fmt: skip
    images = torch.randn(3, 3, 32, 32)
    out = model(images, generator=torch.Generator().manual_seed(0))
    perfect = model.target(images)  # what a perfect decoder predicts (normalised pixels)
    kwargs = dict(patch_size=(8, 8), norm_pix_loss=True, mean=MEAN, std=STD)
    grid = reconstruction_grid(images, perfect, out.mask, **kwargs)
    assert grid.shape == (3 * 32 + 4 * GAP, 3 * 32 + 4 * GAP, 3) and grid.dtype == np.uint8

    def cell(g: np.ndarray, row: int, col: int) -> np.ndarray:
        y, x = GAP + row * (32 + GAP), GAP + col * (32 + GAP)
        return g[y : y + 32, x : x + 32].astype(int)

    for i in range(3):  # a perfect prediction reconstructs the image (to rounding)
        assert np.abs(cell(grid, 2, i) - cell(grid, 0, i)).max() <= 1
    hidden = out.mask[0].view(4, 4).bool()  # patch (row, col) of image 0
    r, c = map(int, hidden.nonzero()[0])
    masked = cell(grid, 1, 0)[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8]
    assert np.all(masked == 128)  # hidden patches are mid-grey in the middle row
    # The model's own (untrained) prediction differs from the image at hidden patches only.
    own = reconstruction_grid(images, out.pred, out.mask, **kwargs)
    vis_r, vis_c = map(int, (~hidden).nonzero()[0])
    window = (slice(vis_r * 8, vis_r * 8 + 8), slice(vis_c * 8, vis_c * 8 + 8))
    assert np.array_equal(cell(own, 2, 0)[window], cell(own, 0, 0)[window])
    assert not np.array_equal(
        cell(own, 2, 0)[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8], cell(own, 0, 0)[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8]
    )


def test_knn_is_skipped_on_unlabeled_data_with_one_log_line(
    synthetic_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = tmp_path / "unlabeled.json"
    cmd = [sys.executable, "-m", "pipeline.data", "index", str(synthetic_shards), "--unlabeled", "--out", str(index),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage = MAEPretraining(load_config(None, ["train.objective=mae", f"data.path={index}"]))
    with caplog.at_level(logging.INFO, logger="pipeline.mae.stage"):
        assert stage._knn_top1(None) is None  # type: ignore[arg-type]  # skipped before the run is touched
        assert stage._knn_top1(None) is None  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "k-NN" in r.getMessage()]
    assert lines == [f"k-NN monitor skipped: {index} has no labels (indexed --unlabeled), and k-NN top-1 needs them"]
