"""The training engine: `python -m pipeline.train --config C [a.b=v ...]`, once per rank.

Names load on first use, so the launcher's checks (``pipeline.train.resume``,
``pipeline.train.dist_env``) run without importing torch and DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.train.loop import NonFiniteError, TrainResult, run

_LAZY = {"NonFiniteError": "loop", "TrainResult": "loop", "run": "loop"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.train.{_LAZY[name]}"), name)


__all__ = ["NonFiniteError", "TrainResult", "run"]
