"""Reading an export folder (written by ``pipeline.train.export``): its file names and its weights.

A leaf, like :mod:`pipeline.artifacts.checkpoints`: fine-tuning and the tests read exports through
here without importing the engine that writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.model.convert import to_ours

WEIGHTS = "model.safetensors"
META = "model.json"
TIMM_CONFIG = "config.json"


def run_export(run_dir: str | Path) -> Path | None:
    """The export that stands for a run: a fine-tune's best evaluation (export/best) when it kept
    one, else the end-of-run export (export); None when the run has neither."""
    root = Path(run_dir) / "export"
    return next((d for d in (root / "best", root) if (d / WEIGHTS).is_file()), None)


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of an export directory or its model.safetensors file."""
    path = Path(path)
    out_dir = path.parent if path.is_file() else path
    weights = out_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{out_dir} has no {WEIGHTS}; expected an export written by pipeline.train.export")
    meta = json.loads((out_dir / META).read_text()) if (out_dir / META).exists() else {}
    return to_ours(load_file(str(weights))), meta  # either layout (an export from before the timm layout too)
