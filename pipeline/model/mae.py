"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

A random ``mask_ratio`` of each image's patches is hidden; our :class:`~pipeline.model.vit.ViT`
encodes the visible ones only (plus the CLS token), a light decoder gets the encoded tokens back in
place with a shared mask token at every hidden position, and predicts the pixels of every patch.
The loss is the mean squared error on the hidden patches only, against per-patch normalised pixels
with ``norm_pix_loss`` (MAE's default: it sharpens the representation, paper table 1c).

:class:`MaskedAutoencoder` *is* a ViT (a subclass) with a ``decoder`` attribute: the encoder's
parameters keep the plain ViT's names (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``,
...), so an export of an MAE run is a ViT state dict plus ``decoder.*`` keys, and fine-tuning,
export and the timm converters read the encoder as they read any ViT. The classifier head is built
(the model config names it) but the objective never uses it.

Masks are drawn from a ``torch.Generator`` the caller passes in, so the trainer keys each draw by
batch identity (seed, rank, step, micro step), as the crop and mixup draws are, and a resumed run
draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.vit import Block, ViT, trunc_normal_

NORM_PIX_EPS = 1e-6  # MAE's (engine_pretrain / models_mae.forward_loss)
DECODER_PREFIX = "decoder."  # the decoder's parameter names; everything else is the encoder (a ViT)


@dataclass
class MAEOutput:
    loss: torch.Tensor  # () MSE over the masked patches, float32
    per_sample: torch.Tensor  # (B,) each image's MSE over its masked patches (all have as many); loss = mean
    pred: torch.Tensor  # (B, N, p1*p2*C) predicted pixels of every patch (normalised when norm_pix_loss)
    mask: torch.Tensor  # (B, N) 1 = masked (hidden from the encoder, in the loss), 0 = visible


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches each image keeps; MAE's ``int(L * (1 - mask_ratio))``, at least one."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE's ``random_masking``).

    Returns ``ids_keep`` (B, K) the visible patches in noise order, ``ids_restore`` (B, N) the inverse
    permutation that puts shuffled tokens back in place, and ``mask`` (B, N) with 1 at hidden patches.
    Drawn on the generator's device (the CPU for a CPU generator), then moved to ``device``.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device)  # (B, N)
    ids_shuffle = noise.argsort(dim=1).to(device)  # ascending: the first K are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def sincos_pos_embed(dim: int, grid: tuple[int, int], *, prefix_tokens: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, prefix + h*w, dim), zeros at the prefix tokens
    (MAE's ``get_2d_sincos_pos_embed``: half the channels encode the row, half the column)."""
    assert dim % 4 == 0, f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}"
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )  # (h, w) each
    parts = []
    for pos in (cols, rows):  # MAE's order: the w coordinate first
        angles = rearrange(pos, "h w -> (h w) 1") * omega  # (h*w, D/4)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), torch.cat(parts, dim=1)])
    return rearrange(emb.float(), "n d -> 1 n d")


class MAEDecoder(nn.Module):
    """Encoded visible tokens -> predicted pixels of every patch, with its own width and depth."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        grid: tuple[int, int],
        prefix_tokens: int,
        patch_pixels: int,
        dim: int,
        depth: int,
        heads: int,
        eps: float,
    ) -> None:
        super().__init__()
        if dim % heads or dim % 4:
            raise ValueError(f"mae decoder_dim={dim} must be divisible by decoder_heads={heads} and by 4")
        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, Dd)
        # Fixed, not learned (MAE): a buffer rebuilt from the grid, so checkpoints need not carry it.
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, prefix_tokens=prefix_tokens), persistent=False)
        # MAE's decoder blocks: mlp 4x, qkv bias, no dropout.
        self.blocks = nn.ModuleList(
            Block(dim, heads=heads, dim_head=dim // heads, mlp_dim=4 * dim, dropout=0.0, qkv_bias=True,
                  drop_path=0.0, eps=eps)
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, P + K, D) encoded prefix and visible tokens -> (B, N, patch_pixels), patches in image order."""
        x = self.embed(x)  # (B, P + K, Dd)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        b, n = ids_restore.shape
        filler = self.mask_token.expand(b, n - visible.shape[1], -1)  # (B, N - K, Dd)
        shuffled = torch.cat([visible, filler], dim=1)  # (B, N, Dd) in noise order
        index = rearrange(ids_restore, "b n -> b n 1").expand(-1, -1, shuffled.shape[-1])
        x = torch.cat([prefix, torch.gather(shuffled, 1, index)], dim=1) + self.pos_embed  # (B, P + N, Dd)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, self.prefix_tokens :]  # (B, N, p1*p2*C)


class MaskedAutoencoder(ViT):
    """A ViT (same arguments, same parameter names) plus an MAE decoder; ``forward`` returns :class:`MAEOutput`.

    ``init_kwargs`` stays the ViT's, so ``ViT(**model.init_kwargs)`` rebuilds the encoder alone.
    """

    def __init__(
        self,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        **vit_kwargs,
    ) -> None:
        super().__init__(**vit_kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # What the cost model (flops.py) and the memory plan need besides the ViT's init_kwargs.
        self.mae_kwargs = dict(mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                               decoder_heads=decoder_heads)  # fmt: skip
        ph, pw = self.patch_size
        channels = self.init_kwargs["channels"]
        self.decoder = MAEDecoder(
            encoder_dim=self.init_kwargs["dim"], grid=self.grid_size, prefix_tokens=self.num_prefix_tokens,
            patch_pixels=ph * pw * channels, dim=decoder_dim, depth=decoder_depth, heads=decoder_heads,
            eps=self.init_kwargs["layer_norm_eps"],
        )  # fmt: skip
        self._init_decoder()

    def _init_decoder(self) -> None:
        # MAE: mask token ~ N(0, 0.02); Linear ~ xavier there, truncated normal here as in our ViT.
        trunc_normal_(self.decoder.mask_token)
        for m in self.decoder.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p1*p2*C), the patch embedding's own flattening order."""
        ph, pw = self.patch_size
        return rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p1*p2*C) -> (B, C, H, W); the inverse of :meth:`patchify`."""
        ph, pw = self.patch_size
        return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=self.grid_size[0], p1=ph, p2=pw)

    def forward_encoder(self, img: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), visible patch ids (B, K) -> normed tokens (B, P + K, D), P prefix (CLS) tokens."""
        h, w = img.shape[-2:]
        if (h, w) != self.image_size:
            raise ValueError(f"input images are {h}x{w} but the model is built for {self.image_size}")
        p = self.num_prefix_tokens
        x = self.patch_embed(img) + self.pos_embed[:, p:]  # (B, N, D); positions added before the shuffle
        index = rearrange(ids_keep, "b k -> b k 1").expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, index)  # (B, K, D)
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :p]).expand(x.shape[0], -1, -1)  # (B, 1, D)
            x = torch.cat([cls, x], dim=1)
        x = self.emb_drop(x)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return self.norm(x)  # MAE normalises every token (the decoder reads them all)

    def target(self, img: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: (B, N, p1*p2*C) pixels, normalised per patch with norm_pix_loss."""
        patches = self.patchify(img.float())
        if not self.norm_pix_loss:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE
        return (patches - mean) / (var + NORM_PIX_EPS).sqrt()

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) the encoder's pooled features of every patch, nothing masked (what a
        fine-tune or the k-NN monitor sees): the ViT's pooling, then its final norm."""
        pooled = self.pool(self.forward_features(img))  # (B, D)
        return pooled if self.norm_before_pool else self.norm(pooled)

    def forward(  # type: ignore[override]
        self, img: torch.Tensor, *, generator: torch.Generator | None = None, features: bool = False
    ) -> MAEOutput | torch.Tensor:
        """The MAE loss and predictions for masks drawn from ``generator``; with ``features=True`` the
        unmasked encoder features instead (through ``forward`` so DeepSpeed's ZeRO-3 hooks gather the
        parameters)."""
        if features:
            return self.features(img)
        assert generator is not None, "MAE's forward draws its masks from the generator it is given"
        ids_keep, ids_restore, mask = random_masking(
            img.shape[0], self.num_patches, self.mask_ratio, generator, device=img.device
        )
        pred = self.decoder(self.forward_encoder(img, ids_keep), ids_restore)  # (B, N, p1*p2*C)
        per_patch = (pred.float() - self.target(img)).pow(2).mean(dim=-1)  # (B, N)
        per_sample = (per_patch * mask).sum(dim=1) / mask.sum(dim=1)  # masked patches only
        return MAEOutput(loss=per_sample.mean(), per_sample=per_sample, pred=pred, mask=mask)
