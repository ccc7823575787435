"""Analytic forward cost of a ViT, in multiply-accumulates (MACs) per image.

Counts the matrix products only: patch projection, qkv, attention scores QK^T and the weighted sum
AV, output projection, MLP and head. LayerNorm, GELU, softmax, biases and residual adds are left
out (< 1 % for the published sizes); this is the convention behind the usual "17.6 GFLOPs" of
ViT-B/16 at 224 (fvcore counts one fused multiply-add as one flop). Training costs about 3x this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.model.presets import pair

if TYPE_CHECKING:  # kept free of torch, like presets.py
    from pipeline.model.vit import ViT


def vit_forward_macs(
    *,
    image_size: int | tuple[int, int],
    patch_size: int | tuple[int, int],
    num_classes: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    channels: int = 3,
    dim_head: int = 64,
    class_token: bool = True,
    **_: Any,
) -> int:
    """MACs per image of the ViT that ``ViT(**kwargs)`` builds (other arguments cost nothing here)."""
    (ih, iw), (ph, pw) = pair(image_size), pair(patch_size)
    patches = (ih // ph) * (iw // pw)
    tokens = patches + (1 if class_token else 0)
    inner = heads * dim_head
    has_proj = not (heads == 1 and dim_head == dim)
    per_block = (
        tokens * dim * 3 * inner  # qkv
        + 2 * heads * tokens * tokens * dim_head  # QK^T and AV
        + (tokens * inner * dim if has_proj else 0)  # output projection
        + 2 * tokens * dim * mlp_dim  # fc1 and fc2
    )
    return patches * (channels * ph * pw) * dim + depth * per_block + dim * num_classes


def forward_macs(model: ViT) -> int:
    """Forward multiply-accumulates per image of ``model`` at its current image size."""
    return vit_forward_macs(**model.init_kwargs)
