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
    blocks = depth * _block_macs(tokens, dim=dim, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim)
    return patches * (channels * ph * pw) * dim + blocks + dim * num_classes


def _block_macs(tokens: int, *, dim: int, heads: int, dim_head: int, mlp_dim: int) -> int:
    """One pre-norm transformer block on ``tokens`` tokens."""
    inner = heads * dim_head
    has_proj = not (heads == 1 and dim_head == dim)
    return (
        tokens * dim * 3 * inner  # qkv
        + 2 * heads * tokens * tokens * dim_head  # QK^T and AV
        + (tokens * inner * dim if has_proj else 0)  # output projection
        + 2 * tokens * dim * mlp_dim  # fc1 and fc2
    )


def mae_forward_macs(*, mask_ratio: float, decoder_dim: int, decoder_depth: int, decoder_heads: int, **vit: Any) -> int:
    """MACs per image of pipeline.model.mae.MaskedAutoencoder: the patch projection of every patch,
    the encoder's blocks on the visible patches (and CLS) only, no head, then the decoder (its input
    projection, blocks on every position, pixel prediction). With MAE's 75 % masking the encoder
    costs about a quarter of the classifier's (He et al. 2022, sec. 3: the source of MAE's speed-up)."""
    (ih, iw), (ph, pw) = pair(vit["image_size"]), pair(vit["patch_size"])
    patches, patch_pixels = (ih // ph) * (iw // pw), vit.get("channels", 3) * ph * pw
    prefix = 1 if vit.get("class_token", True) else 0
    visible = max(1, int(patches * (1 - mask_ratio)))  # as pipeline.model.mae.num_visible
    dim, heads = vit["dim"], vit["heads"]
    encoder = patches * patch_pixels * dim + vit["depth"] * _block_macs(
        prefix + visible, dim=dim, heads=heads, dim_head=vit.get("dim_head", 64), mlp_dim=vit["mlp_dim"]
    )
    d = decoder_dim
    decoder = (prefix + visible) * dim * d + decoder_depth * _block_macs(
        prefix + patches, dim=d, heads=decoder_heads, dim_head=d // decoder_heads, mlp_dim=4 * d
    )
    return encoder + decoder + (prefix + patches) * d * patch_pixels  # the prediction runs on CLS too


def forward_macs(model: ViT) -> int:
    """Forward multiply-accumulates per image of ``model`` at its current image size (an MAE: its
    encoder on the visible patches plus its decoder)."""
    mae = getattr(model, "mae_kwargs", None)
    if mae is not None:
        return mae_forward_macs(**mae, **model.init_kwargs)
    return vit_forward_macs(**model.init_kwargs)
