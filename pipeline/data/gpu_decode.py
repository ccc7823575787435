"""``data.decoder=nvjpeg``: the loader workers ship JPEG bytes, the rank decodes them on its GPU (issue 17).

Decoding with random-resized-crop costs a few hundred images per CPU second, and one H100 trains
ViT-B/16 at ~4,200 img/s, so at that pace the CPUs, not the GPU, set the speed. With this decoder a worker
only reads a sample's header (its size, for the crop), draws the crop and flip exactly as the CPU
decoders do (the same :class:`~pipeline.data.transforms.CropDraws`, seeded by the batch's identity, so
exact resume holds and the geometry is the CPU decoders'), and hands over the encoded bytes. The rank
then decodes the whole batch with torchvision's batched ``decode_jpeg`` (nvJPEG), crops, resizes
(antialiased bilinear), flips and normalises on the device.

What nvJPEG does not take goes to the CPU decoder (PIL) with the same box and flip, and is counted in
``data/gpu_decode_fallbacks``: PNG/WebP, greyscale or CMYK JPEGs and files without an EOI marker are
decoded in the worker (judged from the header, :func:`~pipeline.data.transforms.device_decodable`);
an image ``decode_jpeg`` raises on is decoded by PIL in the rank. What PIL cannot decode either is
reported back as failed, and the caller applies its loader's rule for unreadable samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config.schema import ConfigError
from pipeline.data.transforms import Deferred, Normalize, batch_tensor, crop_resize
from pipeline.metric_names import DATA_GPU_DECODE_FALLBACKS, data_skipped

NO_CUDA = (
    "data.decoder=nvjpeg decodes JPEGs on the GPU, and this process sees no CUDA device; set "
    "data.decoder=pil or data.decoder=torchvision (decoding in the loader's CPU workers), or run on a GPU node"
)


@dataclass(frozen=True)
class JpegBatch:
    """The JPEGs of one batch left to the device: entry k fills batch row ``index[k]``."""

    data: torch.Tensor  # (N,) uint8, every JPEG's bytes back to back (shared memory in a worker)
    spans: tuple[tuple[int, int], ...]  # entry k's bytes: data[start:end]
    index: tuple[int, ...]
    boxes: tuple[tuple[int, int, int, int], ...]  # (top, left, height, width) in full-size pixels
    flips: tuple[bool, ...]

    def encoded(self, k: int) -> torch.Tensor:
        start, end = self.spans[k]
        return self.data[start:end]


@dataclass
class JpegPacker:
    """Worker side: a batch's deferred JPEGs, collected as its rows are rendered. ``nvjpeg``: the decoder
    is nvjpeg, so a row the worker decodes itself is a fallback (counted)."""

    nvjpeg: bool
    blobs: list[bytes] = field(default_factory=list)
    entries: list[tuple[int, int, Deferred]] = field(default_factory=list)  # (row, blob, crop)

    def put(self, u8: np.ndarray, row: int, data: bytes, pixels: np.ndarray | Deferred, counts: dict[str, int]) -> None:
        """Row ``row`` of the worker's (B, H, W, 3) batch: its pixels, or its bytes for the device (and zeros)."""
        if isinstance(pixels, Deferred):
            self.entries.append((row, len(self.blobs), pixels))
            self.blobs.append(data)
            u8[row] = 0
            return
        u8[row] = pixels
        if self.nvjpeg:
            counts[DATA_GPU_DECODE_FALLBACKS] += 1  # not a JPEG the device takes: decoded in the worker

    def copy(self, dst: int, src: int) -> None:
        """Row ``dst`` is a stand-in for row ``src``: the same bytes, box and flip (decoded twice)."""
        self.entries += [(dst, blob, crop) for row, blob, crop in self.entries if row == src]

    def pack(self) -> JpegBatch | None:
        if not self.entries:
            return None
        ends = np.cumsum([len(b) for b in self.blobs])
        data = batch_tensor((int(ends[-1]),), torch.uint8)
        flat = data.numpy()
        for b, end in zip(self.blobs, ends, strict=True):
            flat[end - len(b) : end] = np.frombuffer(b, dtype=np.uint8)
        spans = [(int(e) - len(b), int(e)) for b, e in zip(self.blobs, ends, strict=True)]
        return JpegBatch(
            data=data,
            spans=tuple(spans[blob] for _, blob, _ in self.entries),
            index=tuple(row for row, _, _ in self.entries),
            boxes=tuple(c.box for _, _, c in self.entries),
            flips=tuple(c.flip for _, _, c in self.entries),
        )


def decode_device(device: str | None = None) -> torch.device:
    """Where this rank decodes: its current CUDA device, refused without one (the message says the fix).
    ``device`` overrides it; the tests pass ``"cpu"`` to run the same batched code on the CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor  # (B, 3, H, W) float32 on the device, normalised
    failed: list[int]  # rows neither decoder could decode (their pixels are the worker's zeros)
    fallbacks: int  # JPEGs decode_jpeg raised on, decoded by PIL instead

    def count(self, counts: dict[str, int]) -> None:
        """Add the rank's share of this batch to a loader's counters: its fallbacks, its unreadable rows."""
        counts[DATA_GPU_DECODE_FALLBACKS] += self.fallbacks
        counts[data_skipped("corrupt_image")] += len(self.failed)


def decode_on_device(
    u8: torch.Tensor,
    jpegs: JpegBatch | None,
    *,
    size: tuple[int, int],
    norm: Normalize,
    reduced: bool,
    device: torch.device,
) -> Decoded:
    """The batch on ``device``: the rows of ``u8`` (B, H, W, 3) uint8 the worker decoded on the CPU, and
    the ``jpegs`` decoded, cropped to ``size`` and flipped there; all normalised as :class:`Normalize`
    does. A failed row stays zero. ``reduced``: the CPU fallback's ``data.reduced_decode``."""
    from torchvision.transforms.v2.functional import resized_crop

    B, H, W, _ = u8.shape
    chw = torch.zeros((B, 3, H, W), dtype=torch.uint8, device=device)
    on_cpu = sorted(set(range(B)) - set(jpegs.index if jpegs is not None else ()))
    if on_cpu:  # only the rows the worker decoded cross to the device (the rest are its zeros)
        chw[on_cpu] = u8[on_cpu].to(device).permute(0, 3, 1, 2)  # 'b h w c -> b c h w'
    failed, fallbacks = [], 0
    if jpegs is not None:
        for k, img in enumerate(_decode_jpegs([jpegs.encoded(k) for k in range(len(jpegs.index))], device)):
            row, (top, left, h, w), flip = jpegs.index[k], jpegs.boxes[k], jpegs.flips[k]
            if img is None:
                img = _pil(jpegs.encoded(k), (top, left, h, w), size, flip, reduced=reduced)
                if img is None:
                    failed.append(row)
                else:
                    chw[row], fallbacks = img.to(device), fallbacks + 1
                continue
            out = resized_crop(img, top, left, h, w, list(size), antialias=True)  # (3, H, W) uint8
            chw[row] = out.flip(-1) if flip else out
    return Decoded(norm.on_device(chw), failed, fallbacks)


def _pil(
    encoded: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int], flip: bool, *, reduced: bool
) -> torch.Tensor | None:
    """(3, H, W) uint8 from the CPU decoder (PIL), the same crop and flip; None if it cannot decode it."""
    try:
        pixels = crop_resize(encoded.numpy().tobytes(), lambda *_: box, size, flip, "pil", reduced=reduced)
    except Exception:  # PIL raises many types for bad bytes (as in pixels.decode_or_skip)
        return None
    return torch.tensor(pixels).permute(2, 0, 1)  # 'h w c -> c h w'


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 per JPEG, on ``device``; None for one decode_jpeg raises on."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
        out: list[torch.Tensor | None] = []
        for e in encoded:
            try:
                out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
