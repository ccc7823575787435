"""Named ViT variants ("B/16"): the published widths, depths and heads, as data only.

Kept free of torch so the config loader (and the launcher's pre-submission checks) can expand a
preset cheaply. Values follow Dosovitskiy et al. 2021 (Table 1) and DeiT (Ti, S); like timm's
equivalents, presets use a qkv bias and LayerNorm eps 1e-6, so parameter counts and timm weights
line up exactly.
"""

from __future__ import annotations

# width, depth, heads, mlp width
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
_PATCHES = (16, 14)

PRESET_NAMES: tuple[str, ...] = tuple(f"{s}/{p}" for s in _SIZES for p in _PATCHES)


def pair(t: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image or patch size as (height, width): ``16`` -> ``(16, 16)``."""
    return (int(t[0]), int(t[1])) if isinstance(t, (tuple, list)) else (int(t), int(t))


def preset_kwargs(name: str) -> dict:
    """Architecture keyword arguments of the preset ``name`` (e.g. "B/16")."""
    size, _, patch = name.partition("/")
    if size not in _SIZES or not patch.isdigit() or int(patch) not in _PATCHES:
        raise ValueError(f"unknown ViT preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    dim, depth, heads, mlp_dim = _SIZES[size]
    return {
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "mlp_dim": mlp_dim,
        "dim_head": dim // heads,
        "patch_size": int(patch),
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
    }
