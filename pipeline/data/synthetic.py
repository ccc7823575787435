"""Procedural images whose class is learnable: a shape and a hue per class on a noisy background.

Class c draws shape ``SHAPES[c % 10]`` in hue ``c / classes``; position, size, exact colour, the
background and its noise vary per sample (seeded by (seed, index), so any sample can be redrawn on
its own). The hue alone separates the classes (the background carries a dark tint of it, so a small
random crop still shows the class), which a tiny ViT picks up in tens of steps.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np

SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross", "hstripes", "vstripes", "checker", "diagonal")


def class_names(classes: int) -> list[str]:
    return [f"{SHAPES[c % len(SHAPES)]}-{c}" for c in range(classes)]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) in [0, 1)
    return yy, xx


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float, size: int) -> np.ndarray:
    inside = (np.abs(dy) < r) & (np.abs(dx) < r)
    freq = 4.0 / r  # stripes: about 4 periods across the shape
    return {
        "disc": dy**2 + dx**2 < r**2,
        "square": (np.abs(dy) < 0.8 * r) & (np.abs(dx) < 0.8 * r),
        "triangle": (dy < 0.7 * r) & (dy > -r + 2 * np.abs(dx)),
        "diamond": np.abs(dy) + np.abs(dx) < r,
        "ring": np.abs(np.sqrt(dy**2 + dx**2) - 0.7 * r) < 0.25 * r,
        "cross": ((np.abs(dy) < 0.3 * r) | (np.abs(dx) < 0.3 * r)) & inside,
        "hstripes": (np.sin(dy * freq * np.pi) > 0) & inside,
        "vstripes": (np.sin(dx * freq * np.pi) > 0) & inside,
        "checker": ((np.floor(dy * freq) + np.floor(dx * freq)) % 2 == 0) & inside,
        "diagonal": (np.sin((dy + dx) * freq * np.pi) > 0) & inside,
    }[shape]


def draw(index: int, label: int, *, classes: int, size: int, seed: int) -> np.ndarray:
    """Sample ``index`` of class ``label``: a (size, size, 3) uint8 image."""
    g = np.random.default_rng([seed & (2**63 - 1), index])
    yy, xx = _grid(size)
    cy, cx = 0.5 + g.uniform(-0.15, 0.15, 2)
    r = g.uniform(0.22, 0.34)
    mask = _mask(SHAPES[label % len(SHAPES)], yy - cy, xx - cx, r, size)
    hue = (label / classes + g.uniform(-0.2, 0.2) / classes) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, g.uniform(0.7, 1.0), g.uniform(0.75, 1.0)), dtype=np.float32) * 255
    # a dark tint of the same hue in the background: a random crop that misses the shape still shows the class
    bg = np.array(colorsys.hsv_to_rgb(hue, g.uniform(0.4, 0.8), g.uniform(0.15, 0.35)), dtype=np.float32) * 255
    img = np.where(mask[..., None], fg, bg)
    img += g.normal(0, 12, img.shape).astype(np.float32)  # texture noise, also under the shape
    return np.clip(img, 0, 255).astype(np.uint8)
