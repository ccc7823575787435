"""Every rank's random streams: seeding, and the states a checkpoint keeps so a resume draws on.

Python's, NumPy's, torch's CPU and (when present) CUDA generators are saved per rank with each
checkpoint (``rng_rank{r}.pt``, see pipeline.artifacts.checkpoints) and restored on resume, so the
resumed run draws the numbers the uninterrupted one would have drawn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts.checkpoints import ResumeInfo, read_torch, rng_file


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """This process's generator states, as saved in a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(tag_dir: Path, rank: int, state: dict[str, Any] | None = None) -> Path:
    """Write this rank's states (now, or ``state`` captured earlier) into the checkpoint ``tag_dir``;
    returns the file (for its checksum)."""
    path = rng_file(tag_dir, rank)
    torch.save(capture() if state is None else state, path)
    return path


def restore(info: ResumeInfo, *, rank: int, world_size: int, seed: int, step: int) -> None:
    """Put back this rank's states from ``info``; at another world size, derive fresh ones.

    Rank r of another world size has no saved counterpart: its stream is reseeded from (seed, rank,
    step), reproducible but not the one an uninterrupted run would have drawn.
    """
    path = rng_file(info.path, rank)
    if info.world_size != world_size or not path.exists():
        seed_all(seed + 1000 * rank + step)
        return
    state = read_torch(path)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
