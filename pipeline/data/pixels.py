"""Image bytes -> 8-bit RGB pixels: the one conversion the shard writer and both loader decoders share,
and the one decode-or-skip rule of the train loader, the val loader and the preflight's full decode.

Torch-free (PIL and numpy), so the writer's render processes can import it without torch.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import simplejpeg
from PIL import Image

if TYPE_CHECKING:
    from pipeline.data.tario import RawSample, SkipKind

log = logging.getLogger(__name__)
T = TypeVar("T")

_WHITE = (255, 255, 255)
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


def open_image(data: bytes) -> Image.Image:
    """The image's header only: size, mode and format are known, no pixel is decoded yet."""
    return Image.open(io.BytesIO(data))  # no `with`: closing would free the pixels to_rgb may return as they are


def load_rgb(img: Image.Image, *, reduce: int = 1) -> tuple[Image.Image, int]:
    """Decode an opened image to the end (a truncated file raises here, not later) into 8-bit RGB, and
    the scale it was decoded at: a JPEG at 1/``reduce`` of its size (``reduce`` in 1, 2, 4, 8) through
    libjpeg's DCT scaling (PIL's ``draft``), which skips most of the inverse DCT and the colour
    conversion of the pixels it leaves out; any other format, or ``reduce`` 1, at full size. Output
    pixel (x, y) at scale s covers source pixels [s x, s x + s) x [s y, s y + s) (ceil(W / s) wide)."""
    assert reduce in (1, 2, 4, 8), f"libjpeg scales by 1/2, 1/4 or 1/8, not 1/{reduce}"
    scale, (w, h) = 1, img.size
    if reduce > 1 and img.format == "JPEG" and min(w, h) >= reduce:
        # draft picks the largest s with (w // s, h // s) asked for fitting; it returns the box of the full
        # image in decoded pixels, (0, 0, w / s, h / s), or None when it cannot scale this file
        got = img.draft("RGB", (w // reduce, h // reduce))
        scale = 1 if got is None else round(w / got[1][2])
        assert scale == reduce or got is None, f"PIL's draft chose 1/{scale} for 1/{reduce} of {w}x{h}"
    img.load()
    return to_rgb(img), scale


def load_pixels(img: Image.Image, data: bytes, *, reduce: int = 1) -> tuple[np.ndarray, int]:
    """:func:`load_rgb`'s pixels as a writable (H, W, 3) uint8 array, and the scale they were decoded at.

    A colour JPEG (PIL's ``RGB`` mode: YCbCr or RGB components) is decoded by simplejpeg, which calls
    the same libjpeg-turbo as PIL with the same settings (accurate integer IDCT, smooth chroma
    upsampling; its pixels equal PIL's, ``tests/data/test_transforms.py`` checks it at every scale) but
    writes RGB straight into the array: PIL decodes into 4 bytes a pixel and copies out, ~25 % of a
    decode here. ``strict`` keeps PIL's refusal of truncated or damaged files. Greyscale, CMYK and every
    other format go through PIL and :func:`to_rgb`.
    """
    h, w = img.height, img.width
    if img.format == "JPEG" and img.mode == "RGB":
        assert reduce in (1, 2, 4, 8), f"libjpeg scales by 1/2, 1/4 or 1/8, not 1/{reduce}"
        # simplejpeg takes the strongest libjpeg scaling whose output still has these minimum sides: 1/reduce
        # itself (the next, 3/8 for 1/2, falls short), which maps pixels as load_rgb's draft does
        out = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // reduce), min_width=-(-w // reduce))
        assert out.shape[:2] == (-(-h // reduce), -(-w // reduce)), f"1/{reduce} of {w}x{h} gave {out.shape}"
        return out, reduce
    rgb, scale = load_rgb(img, reduce=reduce)
    return np.array(rgb), scale  # a copy: np.asarray of a PIL image is read-only


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file raises here, not later) into 8-bit RGB."""
    return load_rgb(open_image(data))[0]


def decode_or_skip(sample: RawSample, render: Callable[[bytes], T]) -> tuple[T | None, SkipKind | None]:
    """``(render(sample.image), None)``, or ``(None, kind)`` for a sample to skip: the reader's kind (a
    damaged tar, a missing cls, ...) or ``corrupt_image`` when the bytes do not decode to the end."""
    if sample.bad is not None:
        return None, sample.bad
    if sample.image is None:
        return None, "corrupt_image"
    try:
        return render(sample.image), None
    except Exception as e:  # PIL and torchvision raise many types for bad bytes
        log.debug("skipping %s in %s: %s", sample.key, sample.shard, e)
        return None, "corrupt_image"
