"""Decode + train/eval transforms, one sample at a time, then one normalisation per batch.

Both decoders give an (H, W, 3) uint8 array, written straight into the batch's (B, H, W, 3) uint8
tensor, which a DataLoader worker allocates in shared memory (as ``default_collate`` does) so that
handing it over copies nothing. Workers send uint8, a quarter of float32's bytes (fresh shared
memory is the costly part of a hand-over); the main process converts and normalises into float32
(B, 3, H, W) in one pass, into pinned memory when asked (the caching host allocator reuses it).
The random crop parameters are drawn up front for the whole batch from a generator seeded by the
batch's identity, so an image looks the same on a resumed run (exact resume covers pixels too).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

Decoder = Literal["pil", "torchvision"]
_TRIES = 10  # RandomResizedCrop's attempts before the centre-crop fallback (torchvision's number)


@dataclass(frozen=True)
class CropDraws:
    """Uniform draws for a batch's RandomResizedCrop + flip: (B, tries) arrays and (B,) flips."""

    area: np.ndarray
    log_ratio: np.ndarray
    top: np.ndarray
    left: np.ndarray
    flip: np.ndarray

    @classmethod
    def draw(
        cls, gen: np.random.Generator, n: int, *, scale: tuple[float, float], ratio: tuple[float, float], hflip: float
    ) -> CropDraws:
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        return cls(
            area=gen.uniform(scale[0], scale[1], (n, _TRIES)),
            log_ratio=gen.uniform(log_r[0], log_r[1], (n, _TRIES)),
            top=gen.random((n, _TRIES)),
            left=gen.random((n, _TRIES)),
            flip=gen.random(n) < hflip,
        )

    def box(self, i: int, h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of sample i's crop in an h x w image (torchvision's algorithm)."""
        for t in range(_TRIES):
            target = h * w * self.area[i, t]
            aspect = math.exp(self.log_ratio[i, t])
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(self.top[i, t] * (h - ch + 1)), int(self.left[i, t] * (w - cw + 1)), ch, cw
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            ch, cw = h, int(round(h * max(ratio)))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw


def eval_box(h: int, w: int, size: tuple[int, int], crop_pct: float) -> tuple[int, int, int, int]:
    """Resize so the image covers size / crop_pct, centre-crop ``size``: the crop in source pixels."""
    scale = max(size[0] / crop_pct / h, size[1] / crop_pct / w)
    ch, cw = min(h, size[0] / scale), min(w, size[1] / scale)
    return int(round((h - ch) / 2)), int(round((w - cw) / 2)), max(1, int(round(ch))), max(1, int(round(cw)))


_WHITE = (255, 255, 255)
_JPEG_MAGIC = b"\xff\xd8\xff"
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: the one conversion the writer and both loader decoders share.

    PIL's own ``convert("RGB")`` clips 16-bit and 32-bit samples at 255 (a 16-bit PNG comes out near
    white), so those are scaled here: ``I;16*`` and ``I`` by 255 / 65535 (``I`` is what Pillow gives
    16-bit greyscale from some files and versions; values outside 0..65535 are clipped), ``F`` from
    [0, 1]. Transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``RGB`` with a ``transparency`` key) is
    composited over white, as a viewer shows it and as img2dataset's resizer does; dropping alpha
    would keep whatever colour an editor left under transparent pixels (often black). ``CMYK``,
    ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L`` and ``P`` use PIL's conversion. Raises ValueError for a
    mode PIL cannot convert.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)  # (H, W); I;16B arrives big-endian, numpy swaps
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        unit = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0.0, 1.0)
        return Image.fromarray(np.rint(unit * 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        straight = img.convert("LA") if mode == "La" else img  # PIL has La -> LA, not La -> RGBA
        rgba = straight.convert("RGBA")  # also un-premultiplies RGBa and applies P/L/RGB transparency keys
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file raises here, not later) into 8-bit RGB."""
    img = Image.open(io.BytesIO(data))  # no `with`: closing would free the pixels to_rgb may return as they are
    img.load()
    return to_rgb(img)


def _decode_tv(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8. torchvision decodes 8-bit colour JPEGs (its fast path); everything else goes
    through :func:`to_rgb` so both decoders give the same pixels: torchvision hands out 16-bit PNGs as
    uint16, palette PNGs as indices, and drops alpha instead of compositing it."""
    from torchvision.io import ImageReadMode, decode_image

    if data[:3] == _JPEG_MAGIC:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        if img.dtype == torch.uint8 and img.shape[0] == 3:
            return img
    return torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)  # 'h w c -> c h w'


def crop_resize(data: bytes, box_fn, size: tuple[int, int], flip: bool, decoder: Decoder) -> np.ndarray:
    """Decode ``data``, crop ``box_fn(h, w)``, resize to ``size`` (H, W), maybe flip: (H, W, 3) uint8."""
    if decoder == "pil":
        img = decode_rgb(data)
        top, left, ch, cw = box_fn(img.height, img.width)
        img = img.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img)
    from torchvision.transforms.v2.functional import resized_crop

    img = _decode_tv(data)
    top, left, ch, cw = box_fn(img.shape[1], img.shape[2])
    out = resized_crop(img, top, left, ch, cw, list(size), antialias=True)  # (3, H, W)
    return (out.flip(-1) if flip else out).permute(1, 2, 0).numpy()


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, in shared memory, so sending it copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class Normalize:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), ``(x / 255 - mean) / std``, optionally pinned."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], *, pin: bool = False) -> None:
        self.shift = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        self.pin = pin and torch.cuda.is_available()  # pinning needs a CUDA host allocator

    def __call__(self, hwc: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = hwc.shape
        out = torch.empty((B, 3, H, W), dtype=torch.float32, pin_memory=self.pin)
        out.copy_(hwc.permute(0, 3, 1, 2))  # 'b h w c -> b c h w', uint8 -> float32
        return out.sub_(self.shift).mul_(self.scale)
