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

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from pipeline.data.pixels import decode_rgb, load_pixels, open_image

Decoder = Literal["pil", "torchvision", "nvjpeg"]
_JPEG_MAGIC = b"\xff\xd8\xff"
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


def dct_scale(crop: tuple[int, int], size: tuple[int, int]) -> int:
    """The largest libjpeg reduction s (8, 4, 2 or 1) whose decoded crop (ch / s, cw / s) still covers
    the output ``size`` (H, W) in both dimensions: the resize after it only shrinks, so no detail the
    output can hold is lost (issue 19; this is how the fastest CPU loaders decode)."""
    ch, cw = crop
    return next((s for s in (8, 4, 2) if ch >= s * size[0] and cw >= s * size[1]), 1)


def crop_resize(
    data: bytes, box_fn, size: tuple[int, int], flip: bool, decoder: Decoder, *, reduced: bool = True
) -> np.ndarray:
    """Decode ``data``, crop ``box_fn(h, w)``, resize to ``size`` (H, W), maybe flip: (H, W, 3) uint8.

    ``box_fn`` always gets the full image's (h, w), read from the header before any decoding, so the
    crop's geometry (and the draws behind it) is the same with ``reduced`` on or off. With ``reduced``,
    a JPEG whose crop is at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale
    (:func:`dct_scale`) and the box is mapped onto the smaller image. torchvision has no reduced JPEG
    decode, so its decoder sends those JPEGs down the PIL path (the same pixels as ``decoder="pil"``).
    At full scale both decoders resize with torch's kernel (:func:`resize_u8`); colour JPEGs then come
    out the same from either. ``"nvjpeg"`` lands here only for what the device decoder does not take
    (:func:`render_or_defer`): the ``pil`` path decodes it.
    """
    img = open_image(data)  # header only
    top, left, ch, cw = box_fn(img.height, img.width)
    reduce = dct_scale((ch, cw), size) if reduced and img.format == "JPEG" else 1
    if decoder == "torchvision" and reduce == 1:
        pixels, s = _decode_tv(data).permute(1, 2, 0).numpy(), 1  # 'c h w -> h w c', a view
    else:
        pixels, s = load_pixels(img, data, reduce=reduce)  # (h, w, 3) uint8
    if s == 1:
        return resize_u8(pixels[top : top + ch, left : left + cw], size, flip)
    # Reduced, the box falls between decoded pixels; PIL's resize takes a float box. Rounding it to whole
    # decoded pixels instead shifts the crop by up to half an output pixel: mean differences against the full
    # decode of up to 2.7 levels per image where this keeps them under 1.2 (measured on the test's photos).
    box = (left / s, top / s, (left + cw) / s, (top + ch) / s)
    out = Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR, box=box)
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)


def resize_u8(crop: np.ndarray, size: tuple[int, int], flip: bool) -> np.ndarray:
    """An (h, w, 3) uint8 crop resized to ``size`` (H, W), maybe flipped: (H, W, 3) uint8.

    torch's uint8 antialiased bilinear kernel (channels-last; vectorised) is PIL's BILINEAR filter
    (the same triangle filter widened by the downscale factor) at about a quarter of the CPU time: on
    500x375 photos its pixels differ from PIL's by 0.01-0.04 levels of 255 on average, at most 9 in
    one value (an upscale), by rounding. At the border of a small upscaled crop they differ more (32x32
    digits: mean 0.27, max 30): PIL's box resize reads source pixels just outside the box, while this
    kernel, like torchvision's RandomResizedCrop, sees only the crop. Uses the worker's one thread.
    """
    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)  # 'h w c -> 1 c h w', a view
    x = x.contiguous(memory_format=torch.channels_last)  # the kernel's fast layout (one copy of the crop)
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return (out.flip(-1) if flip else out).permute(1, 2, 0).numpy()  # 'c h w -> h w c'


@dataclass(frozen=True)
class Deferred:
    """A JPEG left to the rank's device decoder (``data.decoder=nvjpeg``): its crop and flip, drawn here."""

    box: tuple[int, int, int, int]  # (top, left, height, width) in full-size source pixels
    flip: bool


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """Whether the device's JPEG decoder takes these bytes, judged from the header alone: an 8-bit
    colour JPEG (PIL reports YCbCr and RGB JPEGs as ``RGB``; greyscale and CMYK go to PIL, which
    converts them as the writer does) that ends in its EOI marker (a truncated file goes to PIL, which
    refuses it as today, where nvJPEG would fill the missing rows with grey). In the entropy-coded data
    0xFF is always followed by 0x00 or a restart marker, so FF D9 near the end can only be the EOI."""
    return img.format == "JPEG" and img.mode == "RGB" and b"\xff\xd9" in data[-64:]


def render_or_defer(
    data: bytes, box_fn, size: tuple[int, int], flip: bool, decoder: Decoder, *, reduced: bool = True
) -> np.ndarray | Deferred:
    """:func:`crop_resize`, except that with ``decoder="nvjpeg"`` a JPEG the device decodes is only
    opened here (its header: the size the crop is drawn on) and comes back as :class:`Deferred`."""
    if decoder == "nvjpeg":
        img = open_image(data)  # header only
        if device_decodable(img, data):
            return Deferred(box_fn(img.height, img.width), flip)
    return crop_resize(data, box_fn, size, flip, decoder, reduced=reduced)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, in shared memory, so sending it copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class Normalize:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), ``(x / 255 - mean) / std``: on the CPU, optionally into
    pinned memory; or, with ``device``, on that device after the uint8 batch crosses (a quarter of
    float32's bytes over PCIe, and no float pass over the batch on the rank's CPU: on the 2-core VM that
    pass took as long as a third of a 224 px JPEG decode, bench/RESULTS.md)."""

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], *, pin: bool = False, device: str | None = None
    ) -> None:
        self.shift = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        self.pin = pin and torch.cuda.is_available()  # pinning needs a CUDA host allocator
        self.device = None if device is None else torch.device(device)
        self._there: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # shift, scale per device

    def __call__(self, hwc: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            cuda = self.device.type == "cuda"  # pinned, the copy is asynchronous: the step before it overlaps
            u8 = (hwc.pin_memory() if cuda else hwc).to(self.device, non_blocking=cuda)
            return self.on_device(u8.permute(0, 3, 1, 2))  # 'b h w c -> b c h w'
        B, H, W, _ = hwc.shape
        out = torch.empty((B, 3, H, W), dtype=torch.float32, pin_memory=self.pin)
        out.copy_(hwc.permute(0, 3, 1, 2))  # 'b h w c -> b c h w', uint8 -> float32
        return out.sub_(self.shift).mul_(self.scale)

    def on_device(self, chw: torch.Tensor) -> torch.Tensor:
        """A uint8 (B, 3, H, W) batch already on its device, normalised there: contiguous float32, as on the CPU."""
        out = torch.empty(chw.shape, dtype=torch.float32, device=chw.device)
        out.copy_(chw)
        if chw.device not in self._there:  # moved once, not per batch
            self._there[chw.device] = (self.shift.to(chw.device), self.scale.to(chw.device))
        shift, scale = self._there[chw.device]
        return out.sub_(shift).mul_(scale)
