"""Watching an MAE pretraining that has no accuracy of its own (issue 18).

- k-NN top-1 (DINO's monitor, Caron et al. 2021, ``eval_knn.py``): the encoder's features of a fixed
  draw of train images are the bank; each val image takes the k most cosine-similar bank images and
  their labels vote with weight exp(similarity / T). It rises as the encoder's features come to
  separate the classes, with no head trained.
- A picture: val images, what the encoder saw (hidden patches grey) and the reconstruction with the
  visible patches pasted back (MAE's own visualisation): people look at these to see whether MAE
  is learning, long before a fine-tune could tell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from pipeline.durable import atomic_write_via
from pipeline.model.mae import NORM_PIX_EPS

GAP = 2  # pixels between the picture's cells


def knn_predict(
    query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, *, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """(B, D) query features, (M, D) bank features, (M,) labels -> (B,) predicted classes (DINO's
    weighted vote). Features are L2-normalised here, so the dot product is the cosine similarity."""
    query, bank = (
        torch.nn.functional.normalize(query.float(), dim=1),
        torch.nn.functional.normalize(bank.float(), dim=1),
    )
    sim, idx = (query @ bank.T).topk(min(k, bank.shape[0]), dim=1)  # (B, k) each
    votes = torch.zeros(query.shape[0], num_classes, device=query.device)
    votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())  # (B, C)
    return votes.argmax(dim=1)


def reconstruction_grid(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, patch_size: tuple[int, int],
    norm_pix_loss: bool, mean: tuple[float, ...], std: tuple[float, ...],
) -> np.ndarray:  # fmt: skip
    """Rows: the images, what the encoder saw (hidden patches grey), the reconstruction with the
    visible patches pasted back. (n, C, H, W) normalised images, (n, N, p1*p2*C) predictions,
    (n, N) mask -> (3H + 4 GAP, nW + (n + 1) GAP, 3) uint8 on white."""
    ph, pw = patch_size
    n, c, h, w = images.shape
    images = images.float().cpu()
    patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)  # (n, N, p1*p2*C)
    pred = pred.float().cpu()
    if norm_pix_loss:  # the decoder predicts per-patch normalised pixels: undo with the patch's own stats
        pred = pred * (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt() + patches.mean(dim=-1, keepdim=True)
    hidden = rearrange(mask.float().cpu(), "b n -> b n 1")  # (n, N, 1)

    def back(x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h // ph, p1=ph, p2=pw, c=c)

    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    grey = (0.5 - m) / s  # mid-grey in normalised pixels
    seen = back(patches * (1 - hidden)) + back(hidden.expand_as(patches)) * grey
    rows = [images, seen, back(patches * (1 - hidden) + pred * hidden)]
    grid = np.full((3 * h + 4 * GAP, n * w + (n + 1) * GAP, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = ((row * s + m).clamp(0, 1) * 255).round().to(torch.uint8)  # (n, C, H, W)
        pixels = pixels.expand(-1, 3, -1, -1) if c == 1 else pixels[:, :3]
        for i in range(n):
            y, x = GAP + r * (h + GAP), GAP + i * (w + GAP)
            grid[y : y + h, x : x + w] = rearrange(pixels[i], "c h w -> h w c").numpy()
    return grid


def save_png(grid: np.ndarray, path: Path) -> Path:
    """Write ``grid`` (H, W, 3) uint8 as a PNG (the tracker uploads it later: the file must stay)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return path
