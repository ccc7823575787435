"""Helpers for the data tests: run simulated ranks, read the keys a split really holds."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

from pipeline.config.schema import DataConfig
from pipeline.data import build_loader, read_index

SIZE = (32, 32)


def data_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"num_workers": 2, "shuffle_buffer": 32, **kw})


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The next ``n`` batches of a ``with_keys=True`` loader."""
    return [batch for _, batch in zip(range(n), loader, strict=False)]


def keys_of(batches) -> list[str]:
    return [k for _, _, keys in batches for k in keys]


def run_ranks(cfg: DataConfig, world: int, batch: int, n: int | None = None, seed: int = 0, state=None):
    """Each simulated rank's next ``n`` batches (default: one epoch) and its final state and counters."""
    out = []
    for rank in range(world):
        with build_loader(cfg, rank=rank, world_size=world, batch_size=batch, image_size=SIZE, seed=seed,
                          with_keys=True) as loader:  # fmt: skip
            if state is not None:
                loader.load_state_dict(state)
            batches = take(loader, loader.batches_per_epoch if n is None else n)
            out.append((batches, loader.state_dict(), loader.counters(), loader))
    return out


def split_keys(path: Path, split: str = "train") -> list[str]:
    """Every sample key of a split, read straight from the tar files (not through the loader)."""
    index = read_index(path)
    keys = []
    for shard in index.split(split).shards:
        with tarfile.open(path / shard.name) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".cls")]
    return keys
