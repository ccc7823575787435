"""The ViT model: ``ViT``, named presets (``vit_preset("B/16")``) and its analytic cost; the masked
autoencoder ``MaskedAutoencoder`` (a ViT plus MAE's decoder, :mod:`pipeline.model.mae`).

Weight converters (seed, vit-pytorch, timm) live in :mod:`pipeline.model.convert`. Names are
loaded on first use (PEP 562), so importing the torch-free ``pipeline.model.presets`` (as the
config loader does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.model.flops import forward_macs, vit_forward_macs
    from pipeline.model.mae import MaskedAutoencoder
    from pipeline.model.presets import PRESET_NAMES, preset_kwargs
    from pipeline.model.vit import ViT, vit_preset

_WHERE = {
    "ViT": "vit",
    "MaskedAutoencoder": "mae",
    "vit_preset": "vit",
    "forward_macs": "flops",
    "vit_forward_macs": "flops",
    "PRESET_NAMES": "presets",
    "preset_kwargs": "presets",
}
__all__ = [
    "PRESET_NAMES",
    "MaskedAutoencoder",
    "ViT",
    "forward_macs",
    "preset_kwargs",
    "vit_forward_macs",
    "vit_preset",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
