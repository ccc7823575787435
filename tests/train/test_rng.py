"""A checkpoint's RNG states put back every generator; another world size reseeds reproducibly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts.checkpoints import ResumeInfo
from pipeline.train import rng


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def info(tag_dir: Path, world_size: int) -> ResumeInfo:
    return ResumeInfo(tag_dir.name, tag_dir, step=7, samples_seen=0, world_size=world_size, zero_stage=0, marker={})


def test_restore_gives_back_the_saved_streams(tmp_path: Path) -> None:
    rng.seed_all(123)
    draws()
    assert rng.save(tmp_path, rank=1) == tmp_path / "rng_rank1.pt"
    expected = draws()
    rng.seed_all(999)  # anything else in between
    rng.restore(info(tmp_path, 2), rank=1, world_size=2, seed=0, step=7)
    assert draws() == expected


def test_another_world_size_reseeds_from_seed_rank_and_step(tmp_path: Path) -> None:
    rng.seed_all(123)
    rng.save(tmp_path, rank=1)
    rng.restore(info(tmp_path, 2), rank=1, world_size=4, seed=5, step=7)
    got = draws()
    rng.seed_all(5 + 1000 * 1 + 7)
    assert got == draws()
