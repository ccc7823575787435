"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

With its defaults, :class:`ViT` computes exactly the function of the 2022 lucidrains/vit-pytorch
ViT our project started from (the "seed"): patches flattened as ``(p1 p2 c)`` and projected by a
Linear, a CLS token, a learned position embedding, pre-norm blocks, CLS or mean pooling, and a
head of LayerNorm + Linear on the pooled vector. Parameter names follow timm
(``patch_embed.proj``, ``blocks.N.attn.qkv``, ...), so the converters in
:mod:`pipeline.model.convert` are mostly renames.

Extra keyword options, all off by default:

- ``qkv_bias``, ``layer_norm_eps``: the published ViT/timm use a qkv bias and eps 1e-6 (the presets set them).
- ``drop_path_rate``: stochastic depth (Huang et al. 2016), rising linearly from 0 at the first
  block to the rate at the last, as in DeiT/timm.
- ``patch_norm``: LayerNorms before and after the patch projection (today's vit-pytorch).
- ``norm_before_pool``: apply the final LayerNorm to every token, then pool (today's vit-pytorch and
  timm's ``norm``). For ``pool='cls'`` this is the same function as the seed's norm-after-pool.
- ``class_token=False``: no CLS token (needs ``pool='mean'``; today's vit-pytorch with mean pooling).

Attention always runs through ``F.scaled_dot_product_attention``; ``dropout`` also drops attention
probabilities in training (the seed drops only after the projections; today's vit-pytorch and timm
drop both), so only a model trained with ``dropout > 0`` sees the difference.

Init (``_init_weights``) follows timm's ``init_weights_vit_timm``: Linear weights, the position
embedding and the CLS token ~ truncated normal (std 0.02), biases 0, LayerNorm 1/0. We cut the
normal at +-2 std; timm passes absolute bounds +-2, i.e. in effect no cut, and draws its CLS token
with std 1e-6.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pipeline.model.presets import pair, preset_kwargs

Pool = Literal["cls", "mean"]
HeadInit = Literal["zero", "trunc_normal"]
Recompute = Literal["none", "full", "selective", "every_k"]
RECOMPUTE_MODES: tuple[str, ...] = get_args(Recompute)
INIT_STD = 0.02

# Selective recompute keeps what is expensive to redo: every Linear (it lowers to addmm, or mm
# without a bias) and the fused attention kernels; norms, GELU, dropout and drop path are redone.
# Korthikanti et al. 2022 keep the matmul outputs and recompute the attention core for its s^2
# matrices; fused attention stores none, so here what is cheap to redo are the elementwise ops.
_MATMUL_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)
# Route the cached outputs through saved-tensor hooks (save_on_cpu, memory accounting) where torch can.
_SAC_HOOK_KWARGS = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


def _selective_context(*, attention_dropout: bool) -> Callable:
    """``context_fn`` for ``checkpoint`` that keeps the matmul and attention outputs.

    With attention dropout the attention kernel draws random numbers: it is recomputed too, because a
    cached random op would not advance the generator in the replay and every later dropout mask of
    the block would differ from the forward's.
    """
    keep = _MATMUL_OPS if attention_dropout else _MATMUL_OPS | _ATTENTION_OPS

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


@torch.no_grad()
def trunc_normal_(t: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    """Fill with N(0, std) cut at +-2 std, by inverting the CDF: one pass over the tensor, where
    rejection sampling (torch's ``nn.init.trunc_normal_``) redraws ~5 times for a large matrix."""
    edge = math.erf(2 / math.sqrt(2))  # erf of the cut, in units of std * sqrt(2)
    return t.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each sample's residual branch with probability ``p``; scale the kept ones by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)  # (B, 1, 1)
    return x * keep.div_(1.0 - p)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): cut into patches, flatten each as (p1 p2 c), project."""

    def __init__(self, *, patch_size: tuple[int, int], channels: int, dim: int, norm: bool, eps: float) -> None:
        super().__init__()
        ph, pw = patch_size
        patch_dim = channels * ph * pw
        self.patch_size = patch_size
        self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)
        self.norm_in = nn.LayerNorm(patch_dim, eps=eps) if norm else nn.Identity()
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm_in, nn.Identity):
            # Same function as Linear on the flattened patches, without materialising the patch
            # copy (and its gradient): a strided convolution with the Linear weight viewed as a kernel.
            kernel = rearrange(
                self.proj.weight, "d (p1 p2 c) -> d c p1 p2", p1=self.patch_size[0], p2=self.patch_size[1]
            )
            x = F.conv2d(img, kernel, self.proj.bias, stride=self.patch_size)  # (B, D, h, w)
            return self.norm_out(rearrange(x, "b d h w -> b (h w) d"))
        return self.norm_out(self.proj(self.norm_in(self.to_patches(img))))


class Attention(nn.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        # As in the seed: one head as wide as the model needs no output projection.
        project_out = not (heads == 1 and dim_head == dim)
        self.proj = nn.Linear(inner, dim) if project_out else nn.Identity()
        self.proj_drop = nn.Dropout(dropout) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)
        # scale 1/sqrt(d) is SDPA's default, the seed's dim_head ** -0.5
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float,
        qkv_bias: bool,
        drop_path: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _check_args(
    image_size: int | tuple[int, int],
    patch_size: int | tuple[int, int],
    pool: str,
    class_token: bool,
    sizes: dict[str, int],
    rates: dict[str, float],
) -> None:
    (ih, iw), (ph, pw) = pair(image_size), pair(patch_size)
    if ph <= 0 or pw <= 0 or ih % ph or iw % pw:
        raise ValueError(
            f"image_size {image_size} is not divisible by patch_size {patch_size}; use an image size that "
            f"is a multiple of the patch size (e.g. image_size={max(ih // ph, 1) * ph if ph > 0 else ih})"
        )
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool={pool!r} is not supported; use pool='cls' (CLS token) or pool='mean' (mean of tokens)")
    if pool == "cls" and not class_token:
        raise ValueError("pool='cls' needs the CLS token; set class_token=True or use pool='mean'")
    for key, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    for key, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {value}")


class ViT(nn.Module):
    """Vision Transformer; keyword-only constructor as in the seed, plus the options in the module doc.

    ``init_kwargs`` holds the constructor arguments (kept current by ``reset_head`` and
    ``resize_pos_embed``), so ``ViT(**model.init_kwargs)`` rebuilds the architecture.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: Pool = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        qkv_bias: bool = False,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-5,
        patch_norm: bool = False,
        norm_before_pool: bool = False,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = dict(
            image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
            heads=heads, mlp_dim=mlp_dim, pool=pool, channels=channels, dim_head=dim_head, dropout=dropout,
            emb_dropout=emb_dropout, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            layer_norm_eps=layer_norm_eps, patch_norm=patch_norm, norm_before_pool=norm_before_pool,
            class_token=class_token,
        )  # fmt: skip
        sizes = dict(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels, dim_head=dim_head)
        rates = dict(dropout=dropout, emb_dropout=emb_dropout, drop_path_rate=drop_path_rate)
        _check_args(image_size, patch_size, pool, class_token, sizes, rates)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head, forward returns features), got {num_classes}")
        self.patch_size = pair(patch_size)
        self.grid_size = (pair(image_size)[0] // self.patch_size[0], pair(image_size)[1] // self.patch_size[1])
        self.pool_type: Pool = pool
        self.norm_before_pool = norm_before_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.recompute: Recompute = "none"
        self.recompute_every = 2

        self.patch_embed = PatchEmbed(
            patch_size=self.patch_size, channels=channels, dim=dim, norm=patch_norm, eps=layer_norm_eps
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None  # (1, 1, D)
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))  # (1, N + 1, D)
        self.emb_drop = nn.Dropout(emb_dropout)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 at the first block
        self.blocks = nn.ModuleList(
            Block(dim, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout, qkv_bias=qkv_bias,
                  drop_path=rate, eps=layer_norm_eps)
            for rate in rates
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def config(self) -> dict:
        """A copy of the constructor arguments (same as ``init_kwargs``)."""
        return dict(self.init_kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, 1 + N, D); (B, N, D) without the CLS token."""
        h, w = img.shape[-2:]
        if (h, w) != self.image_size:
            raise ValueError(
                f"input images are {h}x{w} but the model is built for {self.image_size[0]}x{self.image_size[1]}; "
                f"resize the images or call model.resize_pos_embed(({h}, {w})) first"
            )
        x = self.patch_embed(img)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = self.emb_drop(x + self.pos_embed)
        mode = self.recompute if self.training and torch.is_grad_enabled() else "none"
        if mode == "selective":
            attention_dropout = any(block.attn.dropout > 0 for block in self.blocks)
            context = _selective_context(attention_dropout=attention_dropout)
        for i, block in enumerate(self.blocks):
            if mode == "full" or (mode == "every_k" and i % self.recompute_every == 0):
                # keep only the block's input; redo the whole block in backward
                x = checkpoint(block, x, use_reentrant=False)
            elif mode == "selective":
                x = checkpoint(block, x, use_reentrant=False, context_fn=context, **_SAC_HOOK_KWARGS)
            else:
                x = block(x)
        return self.norm(x) if self.norm_before_pool else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the CLS token, or the mean over all tokens (CLS included, as the seed)."""
        return tokens[:, 0] if self.pool_type == "cls" else tokens.mean(dim=1)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> logits (B, num_classes); the features (B, D) when num_classes == 0."""
        return self.head(pooled if self.norm_before_pool else self.norm(pooled))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pool(self.forward_features(img)))

    @property
    def grad_checkpointing(self) -> bool:
        """Whether training recomputes anything in backward (any ``recompute`` mode but "none")."""
        return self.recompute != "none"

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every block in training (saves activation memory for ~1/3 more compute)."""
        self.set_recompute("full" if enabled else "none")

    def set_recompute(self, mode: Recompute, *, every: int = 2) -> None:
        """What training recomputes in backward instead of keeping (only in training, with grad on).

        "none": keep everything; "full": keep each block's input and redo the block; "selective":
        keep the matmul and attention outputs and redo norms, GELU, dropout and drop path;
        "every_k": redo blocks 0, k, 2k, ... in full and keep the others whole (``every`` = k).
        """
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute mode {mode!r} is not supported; use one of {', '.join(RECOMPUTE_MODES)}")
        if every < 1:
            raise ValueError(f"recompute every={every}: must be >= 1 (1 checkpoints every block, as 'full')")
        self.recompute, self.recompute_every = mode, every

    def reset_head(self, num_classes: int, init: HeadInit = "zero") -> None:
        """Replace the classifier by a fresh one; zero init as in the ViT paper's fine-tuning (sec. 3.2)."""
        if init not in ("zero", "trunc_normal"):
            raise ValueError(f"reset_head init={init!r} is not supported; use 'zero' or 'trunc_normal'")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {num_classes}")
        ref = self.norm.weight
        dim = ref.shape[0]
        head = nn.Linear(dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(head.bias)
            if init == "zero":
                nn.init.zeros_(head.weight)
            else:
                trunc_normal_(head.weight)
        self.head = head
        self.init_kwargs["num_classes"] = num_classes

    @torch.no_grad()
    def resize_pos_embed(self, image_size: int | tuple[int, int]) -> None:
        """Adapt the model to a new image size: bicubic resampling of the patch-grid position
        embedding (antialiased, as timm's ``resample_abs_pos_embed``); the CLS position is kept.

        Replaces the ``pos_embed`` parameter: build the optimizer after calling this.
        """
        _check_args(image_size, self.patch_size, self.pool_type, self.cls_token is not None, {}, {})
        new_grid = (pair(image_size)[0] // self.patch_size[0], pair(image_size)[1] // self.patch_size[1])
        if new_grid != self.grid_size:
            pos = self.pos_embed
            prefix, grid = pos[:, : self.num_prefix_tokens], pos[:, self.num_prefix_tokens :]
            grid = rearrange(grid.float(), "1 (h w) d -> 1 d h w", h=self.grid_size[0])
            grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
            grid = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos.dtype)
            self.pos_embed = nn.Parameter(torch.cat((prefix, grid), dim=1), requires_grad=pos.requires_grad)
            self.grid_size = new_grid
        self.init_kwargs["image_size"] = image_size

    def layer_id(self, param_name: str) -> int:
        """Layer index for layer-wise LR decay: 0 embeddings, i + 1 block i, depth + 1 final norm and head."""
        name = param_name.removeprefix("module.")
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(("norm.", "head.")):
            return self.num_blocks + 1
        raise ValueError(f"layer_id: {param_name!r} is not a parameter name of ViT (see model.named_parameters())")


def vit_preset(name: str, **overrides) -> ViT:
    """A named ViT ("Ti/16", "S/16", "B/16", "L/16", "H/14", ...) at 224 px with 1000 classes,
    the published sizes with timm's qkv bias and LayerNorm eps; ``overrides`` replace any argument."""
    return ViT(**{"image_size": 224, "num_classes": 1000, **preset_kwargs(name), **overrides})
