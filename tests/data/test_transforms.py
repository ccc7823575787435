"""Reduced JPEG decoding (issue 19): the same crop geometry as a full decode, pixels within a stated bound.

The bound, measured on 200 photo-like 500x375 and 1000x750 JPEGs (quality 90; smooth colour waves
plus noise of std 10) for train crops and eval centre crops at outputs 64 to 224, over the crops that
are reduced: mean absolute difference 0.4-1.14 levels of 255, at most 1.31 for a single image, and at
most 10 for a single pixel value. Crops too small to reduce are decoded exactly as before.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import transforms
from pipeline.data.pixels import load_pixels, open_image, to_rgb
from pipeline.data.transforms import CropDraws, crop_resize, dct_scale, eval_box

MEAN_BOUND = 1.5  # per image, mean |reduced - full| in levels of 255
MAX_BOUND = 12  # any pixel value
RATIO = (3 / 4, 4 / 3)


def _photo(i: int, h: int = 375, w: int = 500, fmt: str = "JPEG") -> bytes:
    """Compresses like a photo (~65 KB as JPEG 90 at 500x375): smooth colour waves plus noise."""
    g = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)  # (h, w) in [0, 1)
    f = g.uniform(0.3, 2.0, (3, 2))
    img = np.stack([128 + 90 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + i + c) for c in range(3)], -1)
    img = np.clip(img + g.normal(0, 10, img.shape), 0, 255).astype(np.uint8)  # (h, w, 3)
    out = io.BytesIO()
    Image.fromarray(img).save(out, fmt, quality=90)
    return out.getvalue()


def _recording(box_fn):
    """box_fn that also records each (h, w) it was asked for and the box it gave."""
    calls: list[tuple[tuple[int, int], tuple[int, int, int, int]]] = []

    def box(h: int, w: int) -> tuple[int, int, int, int]:
        calls.append(((h, w), box_fn(h, w)))
        return calls[-1][1]

    return box, calls


def _both(data: bytes, box_fn, size: tuple[int, int], flip: bool, decoder: str = "pil"):
    """(full-decode pixels, reduced-decode pixels, the boxes each asked for)."""
    full_box, full_calls = _recording(box_fn)
    red_box, red_calls = _recording(box_fn)
    full = crop_resize(data, full_box, size, flip, decoder, reduced=False)
    red = crop_resize(data, red_box, size, flip, decoder, reduced=True)
    return full.astype(np.int16), red.astype(np.int16), full_calls, red_calls


def test_dct_scale_is_the_largest_reduction_that_still_covers_the_output() -> None:
    size = (224, 224)
    assert dct_scale((375, 500), size) == 1  # ImageNet's typical image at 224: nothing to gain
    assert dct_scale((448, 448), size) == 2
    assert dct_scale((447, 2000), size) == 1  # both dimensions must cover the output
    assert dct_scale((900, 1000), size) == 4
    assert dct_scale((1792, 1792), size) == 8
    assert dct_scale((5000, 5000), size) == 8  # libjpeg goes no further than 1/8
    assert dct_scale((300, 130), (32, 64)) == 2


@pytest.mark.parametrize("size", [(128, 128), (112, 96)])
def test_train_crops_keep_their_geometry_and_stay_within_the_bound(size: tuple[int, int]) -> None:
    draws = CropDraws.draw(np.random.default_rng(3), 16, scale=(0.08, 1.0), ratio=RATIO, hflip=0.5)
    reduced = 0
    for i in range(16):
        box_fn = functools.partial(draws.box, i, ratio=RATIO)
        full, red, full_calls, red_calls = _both(_photo(i), box_fn, size, bool(draws.flip[i]))
        assert red_calls == full_calls == [((375, 500), box_fn(375, 500))]  # drawn on the full size, same box
        assert red.shape == (*size, 3)
        diff = np.abs(full - red)
        if dct_scale(full_calls[0][1][2:], size) == 1:
            assert diff.max() == 0, "a crop too small to reduce must be decoded exactly as before"
        else:
            reduced += 1
            assert diff.mean() <= MEAN_BOUND and diff.max() <= MAX_BOUND, (i, diff.mean(), diff.max())
    assert reduced >= 8  # the test covers the reduced path, not only the fallback


def test_eval_crops_keep_their_geometry_and_stay_within_the_bound() -> None:
    box_fn = functools.partial(eval_box, size=(128, 128), crop_pct=0.875)
    assert dct_scale(box_fn(375, 500)[2:], (128, 128)) == 2
    for i in range(4):
        full, red, full_calls, red_calls = _both(_photo(i), box_fn, (128, 128), False)
        assert red_calls == full_calls
        diff = np.abs(full - red)
        assert 0 < diff.mean() <= MEAN_BOUND and diff.max() <= MAX_BOUND, (i, diff.mean(), diff.max())


def test_imagenet_size_at_224_is_decoded_exactly_as_before() -> None:
    for i, box_fn in enumerate(
        [functools.partial(eval_box, size=(224, 224), crop_pct=0.875), lambda h, w: (0, 0, h, w)]
    ):
        full, red, _, _ = _both(_photo(i), box_fn, (224, 224), True)
        assert np.array_equal(full, red)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_have_no_reduced_decode(fmt: str) -> None:
    data = _photo(0, 120, 160, fmt)
    full, red, full_calls, red_calls = _both(data, lambda h, w: (0, 0, h, w), (16, 16), False)
    assert np.array_equal(full, red) and full_calls == red_calls == [((120, 160), (0, 0, 120, 160))]


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 deprecates it
def test_torchvision_decoder_sends_reducible_jpegs_down_the_pil_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _photo(5)
    whole = lambda h, w: (0, 0, h, w)  # noqa: E731
    decoded = []
    tv_decode = transforms._decode_tv
    monkeypatch.setattr(transforms, "_decode_tv", lambda b: decoded.append(len(b)) or tv_decode(b))
    # reducible: the same pixels as the PIL decoder's reduced decode, without torchvision's decode
    assert np.array_equal(
        crop_resize(data, whole, (64, 64), True, "torchvision"), crop_resize(data, whole, (64, 64), True, "pil")
    )
    assert decoded == []
    # not reducible: torchvision's own decode, untouched by the switch
    tv = crop_resize(data, whole, (224, 224), False, "torchvision")
    assert decoded == [len(data)]
    assert np.array_equal(tv, crop_resize(data, whole, (224, 224), False, "torchvision", reduced=False))
    # both decode with libjpeg-turbo's accurate IDCT and resize with torch's kernel: the same pixels
    assert np.array_equal(tv, crop_resize(data, whole, (224, 224), False, "pil"))


@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_colour_jpegs_decode_to_pils_pixels_at_every_scale(reduce: int) -> None:
    for i in range(3):
        data = _photo(i)
        got, s = load_pixels(open_image(data), data, reduce=reduce)
        pil = open_image(data)
        pil.draft("RGB", (500 // reduce, 375 // reduce))
        assert s == reduce and got.flags.writeable
        assert np.array_equal(got, np.asarray(pil.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_go_through_pils_conversion(mode: str) -> None:
    out = io.BytesIO()
    Image.open(io.BytesIO(_photo(1))).convert(mode).save(out, "JPEG", quality=90)
    assert open_image(out.getvalue()).mode == mode
    got, s = load_pixels(open_image(out.getvalue()), out.getvalue())
    assert s == 1 and got.shape == (375, 500, 3)
    assert np.array_equal(got, np.asarray(to_rgb(Image.open(io.BytesIO(out.getvalue())))))


def test_truncated_jpeg_is_refused_as_pil_refuses_it() -> None:
    data = _photo(2)[:30000]  # cut mid-scan
    with pytest.raises(OSError):
        Image.open(io.BytesIO(data)).load()
    with pytest.raises(ValueError):
        load_pixels(open_image(data), data)


@pytest.mark.parametrize("size", [(224, 224), (128, 128)])
def test_full_size_crops_resize_as_pil_does_within_rounding(size: tuple[int, int]) -> None:
    """The full-scale path resizes with torch's kernel; PIL's BILINEAR resize is the reference (the bare
    torchvision loop's, and this decoder's before): measured mean 0.01-0.04 levels per image, max 9."""
    draws = CropDraws.draw(np.random.default_rng(4), 32, scale=(0.08, 1.0), ratio=RATIO, hflip=0.5)
    for i in range(32):
        data, box_fn = _photo(i % 8), functools.partial(draws.box, i, ratio=RATIO)
        top, left, ch, cw = box_fn(375, 500)
        pil = (
            Image.open(io.BytesIO(data))
            .convert("RGB")
            .resize(size[::-1], Image.BILINEAR, box=(left, top, left + cw, top + ch))
        )
        ref = np.asarray(pil.transpose(Image.FLIP_LEFT_RIGHT) if draws.flip[i] else pil).astype(np.int16)
        got = crop_resize(data, box_fn, size, bool(draws.flip[i]), "pil", reduced=False).astype(np.int16)
        diff = np.abs(got - ref)
        assert diff.mean() <= 0.1 and diff.max() <= 12, (i, diff.mean(), diff.max())
