"""decode_or_skip: the one rule by which the train loader, the val loader and the preflight skip a sample."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.data.pixels import decode_or_skip, decode_rgb, load_rgb, open_image
from pipeline.data.tario import RawSample


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _sample(image: bytes | None, bad: str | None = None) -> RawSample:
    return RawSample(key="k", label=3, image=image, ext="jpg", bad=bad, shard="s.tar")  # type: ignore[arg-type]


def test_a_good_image_is_rendered_and_bad_ones_say_why() -> None:
    good = _jpeg((200, 10, 10))
    pixels, kind = decode_or_skip(_sample(good), decode_rgb)
    assert kind is None and np.asarray(pixels).shape == (6, 8, 3)
    assert abs(int(np.asarray(pixels)[3, 4, 0]) - 200) <= 3
    assert decode_or_skip(_sample(good[: len(good) // 2]), decode_rgb) == (None, "corrupt_image")  # truncated
    assert decode_or_skip(_sample(b"not an image"), decode_rgb) == (None, "corrupt_image")
    assert decode_or_skip(_sample(None), decode_rgb) == (None, "corrupt_image")
    # the reader's own verdict wins, and the image is not even looked at
    assert decode_or_skip(_sample(good, bad="missing_cls"), decode_rgb) == (None, "missing_cls")


def test_a_render_error_after_decoding_is_a_corrupt_image_too() -> None:
    def render(data: bytes) -> np.ndarray:
        raise ValueError("cannot convert mode")

    assert decode_or_skip(_sample(_jpeg((0, 0, 0))), render) == (None, "corrupt_image")


def _encoded(h: int, w: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def test_load_rgb_decodes_a_jpeg_at_the_asked_scale_and_anything_else_in_full() -> None:
    for reduce, shape in [(1, (375, 500, 3)), (2, (188, 250, 3)), (4, (94, 125, 3)), (8, (47, 63, 3))]:
        img, scale = load_rgb(open_image(_encoded(375, 500, "JPEG")), reduce=reduce)
        assert (scale, np.asarray(img).shape) == (reduce, shape)  # ceil(side / scale)
    img, scale = load_rgb(open_image(_encoded(40, 60, "PNG")), reduce=4)
    assert (scale, img.size) == (1, (60, 40))
