"""``data.decoder=nvjpeg`` (issue 17): workers ship JPEG bytes, the rank decodes them on its device.

The device decode is run on the CPU here (``decode_on="cpu"``: the same batched ``decode_jpeg`` and
``resized_crop`` code, libjpeg-turbo instead of nvJPEG); the CUDA comparison runs where a GPU is.

Tolerance, against ``decoder="pil"`` with ``data.reduced_decode=False`` (both decode with libjpeg-turbo
at full size and differ in the resize only: torchvision's antialiased bilinear against PIL's), measured
on the photo-like JPEGs below (70-130 px, output 32x32): mean |difference| 0.098 levels of 255 over the
train epoch (0.095 val), at most 5 on one pixel value; with some JPEGs sent to PIL's reduced decode
instead, 0.25 and 7. Asserted: MEAN_BOUND, MAX_BOUND. On CUDA nvJPEG replaces libjpeg-turbo (another
IDCT and chroma upsampling): GPU_MEAN_BOUND, GPU_MAX_BOUND, set wider and not yet measured on a GPU.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from pipeline.config.schema import ConfigError, DataConfig
from pipeline.data import build_loader, build_val_loader
from pipeline.data.pixels import open_image
from pipeline.data.sources import encode
from pipeline.data.train_stream import Position
from pipeline.data.transforms import CropDraws, device_decodable
from pipeline.data.writer import Item, write_samples
from pipeline.metric_names import DATA_GPU_DECODE_FALLBACKS, DATA_SAMPLES_READ, data_skipped

SIZE = (32, 32)
N, PNGS = 48, (5, 17, 30)  # train sample ordinals written as PNG
MEAN_BOUND = 0.3  # mean |device - pil| over an epoch, levels of 255
MAX_BOUND = 10  # any pixel value
REDUCED_MEAN_BOUND = 0.6  # against PIL with data.reduced_decode on
GPU_MEAN_BOUND, GPU_MAX_BOUND = 1.5, 32
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalised images are the pixel values


def _photo(i: int) -> np.ndarray:
    """(h, w, 3) uint8, like a photo: smooth colour waves plus noise; sizes vary (crops differ per image)."""
    g = np.random.default_rng(i)
    h, w = int(g.integers(70, 130)), int(g.integers(70, 130))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = g.uniform(0.3, 2.0, (3, 2))
    img = np.stack([128 + 90 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + i + c) for c in range(3)], -1)
    return np.clip(img + g.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def _write(out: Path, *, broken: tuple[int, ...] = ()) -> Path:
    """Shards through the project's writer: JPEGs (quality 90), PNGs at ``PNGS``; ``broken``: JPEGs
    whose Huffman table is zeroed (the header parses, the EOI is there, no decoder reads the scan)."""

    def render(i: int) -> tuple[bytes, str]:
        if i in PNGS:
            return encode(_photo(i), "png", 90), "png"
        data = encode(_photo(i), "jpg", 90)
        return (_broken(data) if i in broken else data), "jpg"

    items = [Item(f"s{i:04d}", i % 3, lambda i=i: render(i)) for i in range(N)]
    write_samples(out, items, classes=["a", "b", "c"], source={"kind": "test"}, image_size=None, val_frac=0.25,
                  shard_max_count=12)  # fmt: skip
    return out


def _broken(data: bytes) -> bytes:
    at = data.index(b"\xff\xc4") + 4  # past the DHT marker and its length
    return data[:at] + bytes(40) + data[at + 40 :]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("nvjpeg") / "mixed")


def _cfg(path: Path, decoder: str, **kw) -> DataConfig:
    return DataConfig(path=str(path), num_workers=kw.pop("num_workers", 0), shuffle_buffer=16, decoder=decoder,
                      **UNIT, **kw)  # fmt: skip


def _epoch(cfg: DataConfig, **kw) -> tuple[list, dict[str, int]]:
    with build_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=3, with_keys=True, **kw) as ld:
        batches = [next(ld) for _ in range(ld.batches_per_epoch)]
        return batches, ld.counters()


def _diff(a: list, b: list) -> tuple[float, float]:
    d = torch.cat([(x - y).abs().flatten() for (x, _, _), (y, _, _) in zip(a, b, strict=True)])
    return float(d.mean()), float(d.max())


def test_device_decode_matches_pil_crops_and_counts_png_fallbacks(shards: Path) -> None:
    pil, _ = _epoch(_cfg(shards, "pil", reduced_decode=False, num_workers=2))
    dev, counts = _epoch(_cfg(shards, "nvjpeg", num_workers=2), decode_on="cpu")  # JpegBatch crosses processes
    # the same samples, labels and order; pixels equal up to the resize (crops and flips the same)
    assert [k for b in dev for k in b[2]] == [k for b in pil for k in b[2]]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(dev, pil, strict=True))
    assert dev[0][0].dtype == torch.float32 and dev[0][0].shape == (8, 3, *SIZE) and dev[0][0].is_contiguous()
    mean, worst = _diff(dev, pil)
    print(f"nvjpeg (CPU) vs pil: mean |diff| {mean:.3f}, max {worst:.1f} levels of 255")
    assert mean < MEAN_BOUND and worst < MAX_BOUND
    # the PNG entries went to PIL in the worker: counted, and their pixels are PIL's exactly
    pngs = [(b, i) for b, (_, _, keys) in enumerate(dev) for i, k in enumerate(keys) if int(k[1:]) in PNGS]
    assert len(pngs) == counts[DATA_GPU_DECODE_FALLBACKS] >= 1
    assert all(torch.equal(dev[b][0][i], pil[b][0][i]) for b, i in pngs)
    assert not any(v for k, v in counts.items() if k.startswith("data/skipped_"))


def test_a_jpeg_decode_jpeg_rejects_is_decoded_by_pil_and_counted(shards: Path, monkeypatch) -> None:
    real = torchvision.io.decode_jpeg

    def fussy(data, **kw):  # refuses every JPEG of more than 5,000 bytes, as nvJPEG refuses some files
        if isinstance(data, list):
            if any(len(d) > 5000 for d in data):
                raise RuntimeError("batched decode failed")
            return real(data, **kw)
        if len(data) > 5000:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fussy)
    pil, _ = _epoch(_cfg(shards, "pil"))  # reduced decode on: the fallback is the PIL decoder as configured
    dev, counts = _epoch(_cfg(shards, "nvjpeg"), decode_on="cpu")
    read = counts[DATA_SAMPLES_READ]
    refused = counts[DATA_GPU_DECODE_FALLBACKS] - sum(int(k[1:]) in PNGS for b in dev for k in b[2])
    assert 0 < refused < read  # some JPEGs refused, decoded by PIL in the rank
    mean, worst = _diff(dev, pil)
    print(f"nvjpeg with refusals vs pil (reduced): mean |diff| {mean:.3f}, max {worst:.1f}")
    assert mean < REDUCED_MEAN_BOUND


def test_a_jpeg_no_decoder_reads_is_skipped_with_the_stand_in_rule(tmp_path: Path) -> None:
    bad = _broken(encode(_photo(0), "jpg", 90))
    assert device_decodable(open_image(bad), bad)  # the worker sends it to the rank
    with pytest.raises(RuntimeError):
        torchvision.io.decode_jpeg(torch.frombuffer(bytearray(bad), dtype=torch.uint8))
    path = _write(tmp_path / "broken", broken=tuple(range(0, N, 4)))
    ref, ref_counts = _epoch(_cfg(path, "pil"))
    dev, counts = _epoch(_cfg(path, "nvjpeg"), decode_on="cpu")
    skipped = data_skipped("corrupt_image")
    # header and EOI pass the worker's check: decode_jpeg and PIL both fail in the rank, counted as
    # corrupt; the entry's place goes to the next readable entry of the batch, as the CPU decoders do
    assert counts[skipped] == ref_counts[skipped] > 0
    assert [b[2] for b in dev] == [b[2] for b in ref]  # the same stand-ins (keys repeat as in pil's)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(dev, ref, strict=True))
    shipped = [k for b in dev for k in b[2]]
    assert not any(int(k[1:]) % 4 == 0 for k in shipped) and len(set(shipped)) < len(shipped)


def test_nvjpeg_without_cuda_is_refused_with_the_fix(shards: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for build in (build_loader, build_val_loader):
        kw = dict(seed=0) if build is build_loader else {}
        with pytest.raises(ConfigError) as e:
            build(_cfg(shards, "nvjpeg"), rank=0, world_size=1, batch_size=8, image_size=SIZE, **kw)
        msg = str(e.value)
        assert "no CUDA device" in msg and "data.decoder=pil or data.decoder=torchvision" in msg
        assert "run on a GPU node" in msg


def test_val_decodes_on_the_device_with_the_eval_crop(shards: Path) -> None:
    def images(cfg: DataConfig, **kw) -> list:
        ld = build_val_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=SIZE, with_keys=True, **kw)
        out = list(ld)
        return out, ld.counters()

    pil, _ = images(_cfg(shards, "pil", reduced_decode=False))
    dev, counts = images(_cfg(shards, "nvjpeg"), decode_on="cpu")
    assert [b[2] for b in dev] == [b[2] for b in pil]
    mean, worst = _diff(dev, pil)
    print(f"val nvjpeg (CPU) vs pil: mean |diff| {mean:.3f}, max {worst:.1f}")
    assert mean < MEAN_BOUND and worst < MAX_BOUND
    assert counts[DATA_GPU_DECODE_FALLBACKS] == sum(int(k[1:]) in PNGS for b in dev for k in b[2] if k)


def test_the_same_batch_identity_ships_the_same_bytes_boxes_and_labels(shards: Path) -> None:
    """Exact resume: a stream started at batch k ships what an uninterrupted stream ships as batch k,
    and the boxes are CropDraws' boxes on the header's size (the CPU decoders' geometry)."""
    with build_loader(_cfg(shards, "nvjpeg"), rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=3,
                      decode_on="cpu") as ld:  # fmt: skip
        stream = ld._stream
    whole = [b for _, b in zip(range(stream.plan(0).batches_per_slot), iter(stream), strict=False)]
    k = 2
    resumed = next(iter(replace(stream, start=Position(0, k))))
    for got, want in ((resumed, whole[k]),):
        (u8, labels, keys, jpegs, _), (u8w, labelsw, keysw, jpegsw, _) = got, want
        assert keys == keysw and torch.equal(labels, labelsw) and torch.equal(u8, u8w)
        assert (jpegs.index, jpegs.boxes, jpegs.flips, jpegs.spans) == (
            jpegsw.index, jpegsw.boxes, jpegsw.flips, jpegsw.spans)  # fmt: skip
        assert torch.equal(jpegs.data, jpegsw.data)
    # the boxes: CropDraws of this batch identity, on each JPEG's full size from its header
    from pipeline.data.plan import rng
    from pipeline.data.slots import _TAG_AUG

    look, plan = stream.look, stream.plan(0)
    draws = CropDraws.draw(rng(stream.seed, 0, plan.generation, 0, k, _TAG_AUG), 8, scale=look.crop_scale,
                           ratio=look.crop_ratio, hflip=look.hflip)  # fmt: skip
    u8, labels, keys, jpegs, _ = resumed
    for n, row in enumerate(jpegs.index):
        w, h = Image.open(io.BytesIO(jpegs.encoded(n).numpy().tobytes())).size
        assert jpegs.boxes[n] == draws.box(row, h, w, look.crop_ratio) and jpegs.flips[n] == bool(draws.flip[row])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nvJPEG batches vs CPU-decoded ones")
def test_nvjpeg_on_cuda_matches_the_cpu_decode(shards: Path) -> None:
    cpu, _ = _epoch(_cfg(shards, "nvjpeg"), decode_on="cpu")
    gpu, counts = _epoch(_cfg(shards, "nvjpeg"))
    assert gpu[0][0].device.type == "cuda"
    assert [b[2] for b in gpu] == [b[2] for b in cpu]
    mean, worst = _diff([(x.cpu(), y, k) for x, y, k in gpu], cpu)
    print(f"nvjpeg (CUDA) vs libjpeg (CPU): mean |diff| {mean:.3f}, max {worst:.1f} levels of 255")
    assert mean < GPU_MEAN_BOUND and worst < GPU_MAX_BOUND
    pil, _ = _epoch(_cfg(shards, "pil", reduced_decode=False))
    mean, worst = _diff([(x.cpu(), y, k) for x, y, k in gpu], pil)
    print(f"nvjpeg (CUDA) vs pil: mean |diff| {mean:.3f}, max {worst:.1f} levels of 255")
    assert mean < GPU_MEAN_BOUND and worst < GPU_MAX_BOUND
    assert counts[DATA_GPU_DECODE_FALLBACKS] == sum(int(k[1:]) in PNGS for b in gpu for k in b[2])
