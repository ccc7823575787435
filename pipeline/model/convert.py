"""State-dict converters between our ViT and the seed, today's vit-pytorch and timm.

Each ``from_*`` maps a state dict of that layout to ours (load it with ``strict=True`` into the
matching :class:`~pipeline.model.ViT`); ``to_timm`` maps ours to timm's ``VisionTransformer``.
A dict that does not fit the expected layout raises :class:`LayoutError` (a ``ValueError``)
listing the missing and unexpected keys.

Which of our options express each architecture:

- seed (2022 vit-pytorch): our defaults.
- vit-pytorch 1.26: ``patch_norm=True``; with ``pool='mean'`` also ``norm_before_pool=True,
  class_token=False``.
- timm ``VisionTransformer``: ``qkv_bias``/``layer_norm_eps`` as built (presets: True, 1e-6);
  ``global_pool='token'`` is our ``pool='cls'``; ``global_pool='avg'`` is ``pool='mean'`` when the
  pooled tokens agree (timm with ``class_token=False``, or with ``pool_include_prefix=True``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import torch
from einops import rearrange

Layout = Literal["ours", "seed", "vit_pytorch", "timm"]
StateDict = dict[str, torch.Tensor]


class LayoutError(ValueError):
    """A state dict does not fit the layout a converter expects."""


# (their name, our name); {i} is a block index, {wb} "weight" or "bias".
_SEED = [
    ("to_patch_embedding.1.{wb}", "patch_embed.proj.{wb}"),
    ("cls_token", "cls_token"),
    ("pos_embedding", "pos_embed"),
    ("transformer.layers.{i}.0.norm.{wb}", "blocks.{i}.norm1.{wb}"),
    ("transformer.layers.{i}.0.fn.to_qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("transformer.layers.{i}.0.fn.to_out.0.{wb}", "blocks.{i}.attn.proj.{wb}"),
    ("transformer.layers.{i}.1.norm.{wb}", "blocks.{i}.norm2.{wb}"),
    ("transformer.layers.{i}.1.fn.net.0.{wb}", "blocks.{i}.mlp.fc1.{wb}"),
    ("transformer.layers.{i}.1.fn.net.3.{wb}", "blocks.{i}.mlp.fc2.{wb}"),
    ("mlp_head.0.{wb}", "norm.{wb}"),
    ("mlp_head.1.{wb}", "head.{wb}"),
]
_VIT_PYTORCH = [
    ("to_patch_embedding.1.{wb}", "patch_embed.norm_in.{wb}"),
    ("to_patch_embedding.2.{wb}", "patch_embed.proj.{wb}"),
    ("to_patch_embedding.3.{wb}", "patch_embed.norm_out.{wb}"),
    ("cls_token", "cls_token"),
    ("pos_embedding", "pos_embed"),
    ("transformer.layers.{i}.0.norm.{wb}", "blocks.{i}.norm1.{wb}"),
    ("transformer.layers.{i}.0.to_qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("transformer.layers.{i}.0.to_out.0.{wb}", "blocks.{i}.attn.proj.{wb}"),
    ("transformer.layers.{i}.1.net.0.{wb}", "blocks.{i}.norm2.{wb}"),
    ("transformer.layers.{i}.1.net.1.{wb}", "blocks.{i}.mlp.fc1.{wb}"),
    ("transformer.layers.{i}.1.net.4.{wb}", "blocks.{i}.mlp.fc2.{wb}"),
    ("transformer.norm.{wb}", "norm.{wb}"),
    ("mlp_head.{wb}", "head.{wb}"),
]
_BLOCK = ["norm1.{wb}", "attn.qkv.{wb}", "attn.proj.{wb}", "norm2.{wb}", "mlp.fc1.{wb}", "mlp.fc2.{wb}"]
_OURS = [
    ("patch_embed.norm_in.{wb}",) * 2,
    ("patch_embed.proj.{wb}",) * 2,
    ("patch_embed.norm_out.{wb}",) * 2,
    ("cls_token",) * 2,
    ("pos_embed",) * 2,
    *[(f"blocks.{{i}}.{n}",) * 2 for n in _BLOCK],
    ("norm.{wb}",) * 2,
    ("head.{wb}",) * 2,
]
_TIMM = [
    ("patch_embed.proj.{wb}",) * 2,
    ("cls_token",) * 2,
    ("pos_embed",) * 2,
    *[(f"blocks.{{i}}.{n}",) * 2 for n in _BLOCK],
    ("norm.{wb}", "norm.{wb}"),
    ("fc_norm.{wb}", "norm.{wb}"),  # timm's final norm after pooling (global_pool='avg')
    ("head.{wb}",) * 2,
]
_TABLES = {"ours": _OURS, "seed": _SEED, "vit_pytorch": _VIT_PYTORCH, "timm": _TIMM}
# Keys every model has, in our names; the block ones per block index found.
_REQUIRED = ["patch_embed.proj.weight", "pos_embed", "norm.weight", "norm.bias"]
_REQUIRED_BLOCK = ["norm1.weight", "attn.qkv.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight"]


def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{wb\}", r"(?P<wb>weight|bias)")
    return re.compile(body + r"\Z")


def _rename(state_dict: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> tuple[StateDict, list[str]]:
    """Rename by (source template, target template) rules; returns the result and the unmatched keys."""
    compiled = [(_pattern(src), dst) for src, dst in rules]
    out: StateDict = {}
    unmatched = []
    for key, value in state_dict.items():
        for pattern, dst in compiled:
            m = pattern.match(key)
            if m:
                out[dst.format(**m.groupdict())] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def _missing(ours: Mapping[str, torch.Tensor]) -> list[str]:
    blocks = {int(k.split(".")[1]) for k in ours if k.startswith("blocks.")}
    required = _REQUIRED + [f"blocks.{i}.{n}" for i in range(max(blocks, default=0) + 1) for n in _REQUIRED_BLOCK]
    return [k for k in required if k not in ours]


def _their_name(our_key: str, layout: Layout) -> str:
    """Our key written in ``layout``'s names (for error messages)."""
    renamed, _ = _rename({our_key: torch.empty(0)}, [(dst, src) for src, dst in _TABLES[layout]])
    return next(iter(renamed), our_key)


def _fail(layout: Layout, missing: list[str], unexpected: list[str], state_dict: Mapping) -> None:
    if not missing and not unexpected:
        return
    try:
        hint = f"; the keys look like the {detect_layout(state_dict)!r} layout: convert with to_ours()"
    except LayoutError:
        hint = ""
    raise LayoutError(
        f"state dict does not fit the {layout!r} layout: missing keys {missing[:8]}"
        f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
        f"{' ...' if len(unexpected) > 8 else ''}{hint}"
    )


def _convert(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> StateDict:
    ours, unexpected = _rename(state_dict, _TABLES[layout])
    missing = [_their_name(k, layout) for k in _missing(ours)]
    _fail(layout, missing, unexpected, state_dict)
    return ours


def from_seed(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The 2022 vit-pytorch ViT (the seed) -> ours; load into ``ViT`` with the same arguments."""
    return _convert(state_dict, "seed")


def from_vit_pytorch(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """vit-pytorch 1.26 ``ViT`` -> ours; load into ``ViT(..., patch_norm=True)``, and for
    ``pool='mean'`` also ``norm_before_pool=True, class_token=False``."""
    ours = _convert(state_dict, "vit_pytorch")
    cls = ours.pop("cls_token", None)  # (1, D), or (0, D) when pooling by mean
    if cls is not None and cls.shape[0] > 0:
        ours["cls_token"] = cls.reshape(1, 1, -1)
    ours["pos_embed"] = ours["pos_embed"].unsqueeze(0)  # (N + 1, D) -> (1, N + 1, D)
    return ours


def from_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm ``VisionTransformer`` (conv patch embedding) -> ours. timm's ``norm`` and ``fc_norm``
    both become our ``norm`` (see the module doc for which pooling matches)."""
    if "norm.weight" in state_dict and "fc_norm.weight" in state_dict:
        raise LayoutError("timm state dict has both norm and fc_norm weights; our ViT has one final LayerNorm")
    ours = _convert(state_dict, "timm")
    weight = ours["patch_embed.proj.weight"]
    if weight.ndim != 4:
        raise LayoutError(f"timm patch_embed.proj.weight must be a conv weight (D, C, p, p), got {tuple(weight.shape)}")
    ours["patch_embed.proj.weight"] = rearrange(weight, "d c p1 p2 -> d (p1 p2 c)")
    return ours


def to_timm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    channels: int = 3,
    patch_size: int | tuple[int, int] | None = None,
    fc_norm: bool = False,
) -> StateDict:
    """Ours -> timm ``VisionTransformer``. Our final norm goes to timm's ``norm`` (timm's default for
    ``global_pool='token'``) or, with ``fc_norm=True``, to ``fc_norm`` (its default for ``'avg'``).
    The patch size is taken as square unless given. A block without output projection (one head
    as wide as the model) gets an identity ``attn.proj``, which timm always has."""
    ours = _convert(state_dict, "ours")
    if any(k.startswith(("patch_embed.norm_in", "patch_embed.norm_out")) for k in ours):
        raise LayoutError("to_timm: timm's VisionTransformer has no LayerNorm around the patch projection (patch_norm)")
    weight = ours["patch_embed.proj.weight"]  # (D, p1 p2 c)
    if weight.ndim != 2:
        raise LayoutError(f"to_timm expects our layout (patch_embed.proj.weight 2-D), got shape {tuple(weight.shape)}")
    if patch_size is None:
        side = math.isqrt(weight.shape[1] // channels)
        if side * side * channels != weight.shape[1]:
            raise LayoutError(f"to_timm: patch_embed.proj has {weight.shape[1]} inputs; pass channels= and patch_size=")
        patch_size = side
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    out = {("fc_norm" + k[4:] if fc_norm and k.startswith("norm.") else k): v for k, v in ours.items()}
    # contiguous: safetensors refuses to save a strided view
    out["patch_embed.proj.weight"] = rearrange(
        weight, "d (p1 p2 c) -> d c p1 p2", p1=ph, p2=pw, c=channels
    ).contiguous()
    for key in [k for k in ours if k.endswith("attn.qkv.weight")]:
        proj = key.replace("qkv.weight", "proj.")
        if proj + "weight" not in ours:
            dim = weight.shape[0]
            out[proj + "weight"] = torch.eye(dim, dtype=weight.dtype, device=weight.device)
            out[proj + "bias"] = torch.zeros(dim, dtype=weight.dtype, device=weight.device)
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    """Which layout ``state_dict`` is in, judged by its patch-embedding keys."""
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is not None:
        return "timm" if weight.ndim == 4 else "ours"
    if "to_patch_embedding.2.weight" in state_dict:
        return "vit_pytorch"
    if "to_patch_embedding.1.weight" in state_dict:
        return "seed"
    keys = list(state_dict)[:5]
    hint = ""
    for key in state_dict:
        for known in ("patch_embed.proj.weight", "to_patch_embedding.1.weight"):
            if key.endswith("." + known):
                hint = f" (keys carry the prefix {key[: -len(known)]!r}: strip it first)"
    raise LayoutError(
        f"unknown ViT state-dict layout{hint}: expected patch_embed.proj.weight (ours or timm) or "
        f"to_patch_embedding.* (seed or vit-pytorch); first keys: {keys}"
    )


# A key our own-layout export files carry besides the weights. timm's loader, pointed at such a file,
# would reshape our 2-D patch projection as (c, p1, p2) without a word (ours is (p1, p2, c)) and load
# wrong weights; its strict load refuses an unexpected key instead, and prints this name.
OUR_LAYOUT_MARKER = "this_file_is_not_timm_layout.load_the_timm_folder_of_this_export"


def without_marker(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if OUR_LAYOUT_MARKER not in state_dict:
        return state_dict
    return {k: v for k, v in state_dict.items() if k != OUR_LAYOUT_MARKER}


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed wrappers, torch.compile


def to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any known layout -> ours. A wrapper prefix shared by all keys ("module.", "_orig_mod.") is removed."""
    state_dict = without_marker(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    layout = detect_layout(state_dict)
    if layout == "ours":
        return _convert(state_dict, "ours")
    return {"seed": from_seed, "vit_pytorch": from_vit_pytorch, "timm": from_timm}[layout](state_dict)


def infer_vit_kwargs(state_dict: Mapping[str, torch.Tensor], *, heads: int | None = None, channels: int = 3) -> dict:
    """The ``ViT`` arguments that a state dict in our layout determines.

    Always: dim, depth, mlp_dim, num_classes, qkv_bias, patch_norm, class_token. patch_size and
    image_size when patches and the patch grid are square (``channels`` given). heads and dim_head
    only when there is no output projection (1 head as wide as the model) or ``heads`` is given:
    weights fix heads x dim_head, not the split. Never: pool, dropout rates, layer_norm_eps,
    norm_before_pool (which changes nothing for pool='cls').
    """
    _fail("ours", _missing(state_dict), _rename(state_dict, _OURS)[1], state_dict)
    pos, proj = state_dict["pos_embed"], state_dict["patch_embed.proj.weight"]
    head = state_dict.get("head.weight")
    out: dict = {
        "dim": pos.shape[-1],
        "depth": 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")),
        "mlp_dim": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "num_classes": head.shape[0] if head is not None else 0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "patch_norm": "patch_embed.norm_in.weight" in state_dict,
        "class_token": "cls_token" in state_dict,
    }
    side = math.isqrt(proj.shape[1] // channels)
    grid = math.isqrt(pos.shape[1] - int(out["class_token"]))
    if side * side * channels == proj.shape[1]:
        out["patch_size"] = side
        if grid * grid == pos.shape[1] - int(out["class_token"]):
            out["image_size"] = grid * side
    inner = state_dict["blocks.0.attn.qkv.weight"].shape[0] // 3
    if "blocks.0.attn.proj.weight" not in state_dict:
        out.update(heads=1, dim_head=out["dim"])
    elif heads is not None:
        if inner % heads:
            raise ValueError(f"heads={heads} does not divide the attention width {inner}; pick a divisor of {inner}")
        out.update(heads=heads, dim_head=inner // heads)
    return out


# timm's VisionTransformer takes no LayerNorm eps argument; a registered variant fixes it. Its config.json
# names such a variant as "architecture" and overrides every other argument with "model_args", so the
# eps is chosen by the name: 1e-6 (timm's default, our presets) or 1e-5 (the seed's, torch's default;
# timm's TinyCLIP variant builds it, and pre_norm=False below undoes that variant's extra norm).
TIMM_ARCH_BY_EPS = {1e-6: "vit_base_patch16_224", 1e-5: "vit_xsmall_patch16_clip_224"}


def timm_model_args(model: Mapping) -> tuple[str, dict]:
    """timm's architecture name and ``VisionTransformer`` arguments that rebuild our model from its
    config (a ModelConfig as a dict).

    Raises LayoutError when timm cannot express it: LayerNorms around the patch projection, heads
    narrower than ``dim / heads``, an MLP width that is not a whole ratio timm reproduces, a
    LayerNorm eps other than those of :data:`TIMM_ARCH_BY_EPS`.
    """
    size = model["image_size"]
    patch = model["patch_size"]
    dim, heads, mlp_dim = model["dim"], model["heads"], model["mlp_dim"]
    if model.get("patch_norm"):
        raise LayoutError("timm's VisionTransformer has no LayerNorm around the patch projection (patch_norm)")
    if heads * model["dim_head"] != dim:
        raise LayoutError(f"timm splits dim {dim} into {heads} heads of {dim // heads}; this model's heads are "
                          f"{model['dim_head']} wide")  # fmt: skip
    if int(dim * (mlp_dim / dim)) != mlp_dim:
        raise LayoutError(f"timm cannot rebuild an MLP of width {mlp_dim} from dim {dim}")
    if model["layer_norm_eps"] not in TIMM_ARCH_BY_EPS:
        raise LayoutError(
            f"timm builds LayerNorm eps {' or '.join(map(str, TIMM_ARCH_BY_EPS))}, not {model['layer_norm_eps']}"
        )
    mean_pool = model["pool"] == "mean"
    return TIMM_ARCH_BY_EPS[model["layer_norm_eps"]], {
        "img_size": list(size) if isinstance(size, (list, tuple)) else size,
        "patch_size": list(patch) if isinstance(patch, (list, tuple)) else patch,
        "in_chans": model["channels"],
        "num_classes": model["num_classes"],
        "embed_dim": dim,
        "depth": model["depth"],
        "num_heads": heads,
        "mlp_ratio": mlp_dim / dim,
        "qkv_bias": model["qkv_bias"],
        "class_token": model["class_token"],
        "global_pool": "avg" if mean_pool else "token",
        "pool_include_prefix": mean_pool and model["class_token"],  # our mean pools every token
        "fc_norm": mean_pool and not model.get("norm_before_pool", False),
        "pre_norm": False,
    }
