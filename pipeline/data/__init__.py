"""Data: tar shards written with webdataset, streamed with exact balance, exact resume and bad-data skips.

Public API (the training engine, launcher and fine-tune code call these)::

    build_loader(cfg.data, rank=, world_size=, batch_size=, image_size=, seed=, pin_memory=False)
    build_val_loader(cfg.data, rank=, world_size=, batch_size=, image_size=)
    preflight(path, split=, ranks=, workers=, decode=) -> PreflightReport
    check_classes(index, num_classes, key=, labels_needed=) -> str   (the head fits the labels; labels exist)
    read_index(path) -> DataIndex
    MixupCutmix(cfg.data, num_classes, seed=, rank=), soft_target_cross_entropy(logits, targets)
    write_synthetic(...), write_digits(...), write_imagefolder(...)

CLI: ``python -m pipeline.data write|index|check`` (see :mod:`pipeline.data.__main__`).
Design: :mod:`pipeline.data.loader` (streams) and :mod:`pipeline.data.plan` (the arithmetic).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.data.errors import DataError, PreflightError
from pipeline.data.index import DataIndex, read_index
from pipeline.data.preflight import PreflightReport, check_classes, preflight  # binds preflight over the submodule

# The rest loads on first use: the preflight CLI and the launcher run without importing torch.
_LAZY = {
    "COUNTER_NAMES": "samples",
    "NO_LABEL": "samples",
    "SKIPPED": "samples",
    "TrainLoader": "train_stream",
    "ValLoader": "val",
    "build_loader": "loader",
    "build_val_loader": "loader",
    "MixupCutmix": "mix",
    "one_hot": "mix",
    "soft_target_cross_entropy": "mix",
    "write_digits": "writer",
    "write_imagefolder": "writer",
    "write_synthetic": "writer",
}

if TYPE_CHECKING:
    from pipeline.data.loader import build_loader, build_val_loader
    from pipeline.data.mix import MixupCutmix, one_hot, soft_target_cross_entropy
    from pipeline.data.samples import COUNTER_NAMES, NO_LABEL, SKIPPED
    from pipeline.data.train_stream import TrainLoader
    from pipeline.data.val import ValLoader
    from pipeline.data.writer import write_digits, write_imagefolder, write_synthetic


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.data.{_LAZY[name]}"), name)


__all__ = [
    "COUNTER_NAMES",
    "DataError",
    "DataIndex",
    "MixupCutmix",
    "NO_LABEL",
    "PreflightError",
    "PreflightReport",
    "SKIPPED",
    "TrainLoader",
    "ValLoader",
    "build_loader",
    "build_val_loader",
    "check_classes",
    "one_hot",
    "preflight",
    "read_index",
    "soft_target_cross_entropy",
    "write_digits",
    "write_imagefolder",
    "write_synthetic",
]
