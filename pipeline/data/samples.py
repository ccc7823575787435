"""What the train and val streams share: a split's shards as plain data, how samples become pixels,
per-slot counts of samples read and skipped, and reading samples at given positions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import DataConfig
from pipeline.data.index import CLS_LABELS, DataIndex, LabelSpec
from pipeline.data.tario import SKIP_KINDS, RawSample, ReaderCache
from pipeline.data.transforms import Decoder
from pipeline.metric_names import DATA_GPU_DECODE_FALLBACKS, DATA_SAMPLES_READ, data_skipped

COUNTER_NAMES = (*(data_skipped(k) for k in SKIP_KINDS), DATA_SAMPLES_READ, DATA_GPU_DECODE_FALLBACKS)
# A batch's label per entry: a class index; NO_LABEL for a readable sample of an unlabeled data set (an
# objective such as MAE reads no labels); SKIPPED for an entry that holds no sample (padding of the last
# val batch, or an unreadable sample). Separate values, so that "no label" never reads as "no image".
NO_LABEL = -1
SKIPPED = -2
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Source:
    """A split's shards, as plain data a worker process can receive."""

    root: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    label: LabelSpec = CLS_LABELS
    classes: tuple[str, ...] = ()  # json labels may name their class
    index: str = ""  # the index file, for messages

    @classmethod
    def of(cls, index: DataIndex, split: str) -> Source:
        info = index.split(split)
        # Unlabeled data loads too (its samples carry NO_LABEL); whether the objective can train on it is
        # check_classes' question, asked by the launcher and by every rank before the loaders start.
        return cls(
            str(index.root),
            tuple(s.name for s in info.shards),
            tuple(s.samples for s in info.shards),
            index.num_classes,
            index.label,
            index.classes if index.label.kind == "json" else (),
            str(index.path),
        )

    def readers(self) -> ReaderCache:
        counts = dict(zip(self.names, self.counts, strict=True))
        return ReaderCache(Path(self.root), counts, self.num_classes, label=self.label, classes=self.classes)


@dataclass(frozen=True)
class Look:
    """How samples become pixels: size (H, W), normalisation, decoder, and the train augmentation."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    decoder: Decoder
    reduced_decode: bool
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    eval_crop_pct: float

    @classmethod
    def of(cls, cfg: DataConfig, image_size: tuple[int, int]) -> Look:
        fields = ("mean", "std", "decoder", "reduced_decode", "crop_scale", "crop_ratio", "hflip", "eval_crop_pct")
        return cls(image_size=tuple(image_size), **{f: getattr(cfg, f) for f in fields})


class Tally:
    """Per-slot counts of samples read and skipped (by kind and by shard), sent along with each batch."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTER_NAMES, 0)
        self.bad_shards: Counter[str] = Counter()

    def skip(self, kind: str, shard: str) -> None:
        self.counts[data_skipped(kind)] += 1
        self.bad_shards[shard] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "bad_shards": dict(self.bad_shards.most_common(20))}


def stand_in(i: int, good: list[int]) -> int:
    """The train batch entry that takes unreadable entry i's place: the next readable one, cyclically
    (it depends on file contents only, so resume stays exact)."""
    return next((g for g in good if g > i), good[0])


def read_positions(locate, positions: np.ndarray, source: Source, readers: ReaderCache) -> list[RawSample]:
    """Samples at ``positions`` (any order), each shard read once in increasing ordinal order."""
    shard_idx, ordinal = locate(positions)
    out: list[RawSample] = [None] * len(positions)  # type: ignore[list-item]
    by_pos = np.argsort(positions, kind="stable")
    groups = np.split(by_pos, np.flatnonzero(np.diff(shard_idx[by_pos]) != 0) + 1) if len(by_pos) else []
    for group in groups:
        name = source.names[int(shard_idx[group[0]])]
        for i, sample in zip(group, readers.get(name).read([int(o) for o in ordinal[group]]), strict=True):
            out[int(i)] = sample
    return out
