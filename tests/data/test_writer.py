"""The shard writers: what lands on disk, determinism, and the sources' bad inputs."""

from __future__ import annotations

import io
import json
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import PreflightError, build_val_loader, read_index, write_imagefolder, write_synthetic
from pipeline.data.index import sha256_file
from pipeline.data.pixels import decode_rgb, to_rgb
from pipeline.data.sources import read_report
from pipeline.data.transforms import _decode_tv
from tests.data.conftest import SIZE, data_cfg, split_keys
from tests.fixtures.shards import SYNTHETIC


def test_synthetic_shards_match_their_index(synthetic_shards):
    index = read_index(synthetic_shards)
    assert index.classes == ("disc-0", "square-1", "triangle-2", "diamond-3")
    train, val = index.split("train"), index.split("val")
    assert (train.samples, val.samples) == (360, 40) and sum(train.class_counts) == 360
    assert [s.samples for s in train.shards] == [50] * 7 + [10]  # shard_max_count=50
    for shard in train.shards + val.shards:
        path = synthetic_shards / shard.name
        assert path.stat().st_size == shard.bytes and sha256_file(path) == shard.sha256
        names = [m.name for m in tarfile.open(path).getmembers()]
        assert len(names) == 2 * shard.samples and {n.split(".", 1)[1] for n in names} == {"cls", "jpg"}
    assert not set(split_keys(synthetic_shards)) & set(split_keys(synthetic_shards, "val"))
    counts = np.zeros(4, dtype=int)
    for shard in train.shards:
        with tarfile.open(synthetic_shards / shard.name) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    counts[int(tf.extractfile(m).read())] += 1
    assert counts.tolist() == list(train.class_counts)


def test_writer_is_deterministic_and_refuses_to_overwrite(tmp_path):
    a = write_synthetic(tmp_path / "a", n=60, classes=3, size=16, seed=7, shard_max_count=25)
    b = write_synthetic(tmp_path / "b", n=60, classes=3, size=16, seed=7, shard_max_count=25)
    assert [s.sha256 for s in a.split("train").shards] == [s.sha256 for s in b.split("train").shards]
    c = write_synthetic(tmp_path / "c", n=60, classes=3, size=16, seed=8, shard_max_count=25)
    assert [s.sha256 for s in a.split("train").shards] != [s.sha256 for s in c.split("train").shards]
    with pytest.raises(PreflightError, match="already holds a data set.*--overwrite"):
        write_synthetic(tmp_path / "a", n=10, classes=2, size=16)
    write_synthetic(tmp_path / "a", n=10, classes=2, size=16, val_frac=0.0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["_info.json", "train-000000.tar"]


def test_digits_are_the_real_data_set(digits_shards):
    index = read_index(digits_shards)
    assert index.classes == tuple(str(d) for d in range(10))
    assert index.split("train").samples + index.split("val").samples == 1797
    assert index.image_size == (32, 32)
    total = np.add(index.split("train").class_counts, index.split("val").class_counts)
    assert total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's class sizes


def _tree(root, spec):
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            colour = (255, 0, 0) if cls == "red" else (0, 0, 255)
            ext = "png" if i % 2 else "jpg"
            Image.new("RGB", (20 + i, 24), colour).save(root / cls / f"{i}.{ext}")


def test_imagefolder_tree_keeps_bytes_and_labels(tmp_path):
    _tree(tmp_path / "src", {"blue": 6, "red": 4})
    index = write_imagefolder(tmp_path / "out", source=tmp_path / "src", val_frac=0.5, seed=1)
    assert index.classes == ("blue", "red") and index.image_format == "jpg+png"
    val = build_val_loader(data_cfg(tmp_path / "out", num_workers=0), rank=0, world_size=1, batch_size=8,
                           image_size=SIZE)  # fmt: skip
    images, labels = next(iter(val))
    ok = labels >= 0
    red = images[ok][:, 0].mean((1, 2)) > images[ok][:, 2].mean((1, 2))  # red channel brighter than blue
    assert ok.sum() == 5 and red.tolist() == (labels[ok] == 1).tolist()
    with tarfile.open(tmp_path / "out" / index.split("train").shards[0].name) as tf:
        meta = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert {m["class"] for m in meta} <= {"blue", "red"} and all(m["path"].startswith(str(tmp_path)) for m in meta)


def test_list_file_labels_and_its_errors(tmp_path):
    _tree(tmp_path / "src", {"blue": 2, "red": 2})
    good = tmp_path / "good.txt"
    good.write_text("# path,label\nsrc/blue/0.jpg,1\nsrc/blue/1.png,1\n\nsrc/red/0.jpg,0\nsrc/red/1.png,2\n")
    index = write_imagefolder(tmp_path / "out", source=good, val_frac=0.0)
    assert index.classes == ("0", "1", "2") and index.split("train").class_counts == (1, 2, 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("src/blue/0.jpg,1\nsrc/red/0.jpg,cat\n")
    with pytest.raises(PreflightError, match=r"bad.txt:2: wrong label type 'cat'"):
        write_imagefolder(tmp_path / "o2", source=bad)
    bad.write_text("src/blue/0.jpg,1\nsrc/nope.jpg,0\n")
    with pytest.raises(PreflightError, match=r"bad.txt:2: .*nope.jpg is not an existing"):
        write_imagefolder(tmp_path / "o3", source=bad, strict=True)
    with pytest.raises(PreflightError, match="does not exist"):
        write_imagefolder(tmp_path / "o4", source=tmp_path / "missing")
    (tmp_path / "src" / "empty").mkdir()
    with pytest.raises(PreflightError, match="empty: class folder with no"):
        write_imagefolder(tmp_path / "o5", source=tmp_path / "src")
    (tmp_path / "src" / "empty").rmdir()
    (tmp_path / "src" / "red" / "2.jpg").write_bytes(b"not an image")
    with pytest.raises(PreflightError, match="2.jpg: PIL cannot identify an image in it"):
        write_imagefolder(tmp_path / "o6", source=tmp_path / "src", strict=True)


def test_synthetic_classes_are_separable_by_colour(synthetic_shards):
    # the class is in the image: the mean hue alone sorts samples into their classes
    val = build_val_loader(data_cfg(synthetic_shards, num_workers=0), rank=0, world_size=1, batch_size=40,
                           image_size=SIZE)  # fmt: skip
    images, labels = next(iter(val))
    means = images.mean((2, 3))  # (B, 3)
    centroids = [means[labels == c].mean(0) for c in range(SYNTHETIC["classes"])]
    nearest = [min(range(4), key=lambda c: float((m - centroids[c]).norm())) for m in means]
    assert np.mean(np.array(nearest) == labels.numpy()) > 0.9


# --- bad files, odd pixel modes, staged writes, a separate val source -------------------------------------------


def _png(width: int, height: int, *, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand: chunks are length, type, data, CRC (RFC 2083); PIL never sees the pixels first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of ``values`` (H, W) grey or (H, W, 3) RGB; every row starts with filter type 0."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return _png(values.shape[1], values.shape[0], bit_depth=16, color_type=0 if values.ndim == 2 else 2, rows=rows)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


RAMP16 = (np.arange(48, dtype=np.int64).reshape(6, 8) * 1393 + 11).astype(
    np.uint16
)  # 11 .. 65482, not multiples of 257
GREY16 = 4000  # PIL's convert("RGB") clips this to 255; scaled it is round(4000 / 257) = 16


def _bad_tree(root: Path) -> None:
    """Two classes of good images in odd modes, and every kind of file the writer must skip."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / "a" / f"good{i}.jpg", quality=95)
    (root / "b" / "grey16.png").write_bytes(_png16(np.full((10, 12), GREY16, dtype=np.uint16)))
    (root / "b" / "ramp16.png").write_bytes(_png16(RAMP16))
    (root / "b" / "rgb16.png").write_bytes(_png16(np.stack([np.full((4, 4), k * 257) for k in (200, 30, 7)], -1)))
    (root / "b" / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))  # red
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)  # index 0 red, index 1 black and transparent
    pal.putpixel((0, 0), 1)
    pal.save(root / "b" / "pal.png", transparency=1)
    # to skip:
    (root / "a" / "fake.jpg").write_text("not a JPEG, a text file with the wrong name\n")
    (root / "a" / "._good0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    whole = _jpeg(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    (root / "a" / "trunc.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # PIL's verify() passes this one
    (root / "b" / "bomb.png").write_bytes(_png(100_000, 100_000, bit_depth=8, color_type=0))  # DecompressionBombError
    (root / "b" / "bomb_warn.png").write_bytes(_png(10_000, 10_000, bit_depth=8, color_type=0))  # only PIL's warning
    (root / "a" / "notes.txt").write_text("labels were checked by hand\n")
    (root / "b" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def _members(out: Path, split: str = "train") -> dict[str, bytes]:
    """Source file name -> image bytes, for every sample of ``split`` (read from the tar files)."""
    index, found = read_index(out), {}
    for shard in index.split(split).shards:
        with tarfile.open(out / shard.name) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                image = next(v for k, v in files.items() if k.startswith(key + ".") and k.split(".")[-1] in IMG_EXT)
                found[Path(json.loads(data)["path"]).name] = image
    return found


IMG_EXT = {"jpg", "png", "webp"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.data", "write", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".writing-" in p.name or ".replaced-" in p.name)


def test_write_skips_and_reports_bad_files_and_converts_odd_modes(tmp_path):
    _bad_tree(tmp_path / "src")
    out = tmp_path / "out"
    run = _cli("--out", str(out), str(tmp_path / "src"), "--val-frac", "0", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "SKIPPED 8 files" in run.stderr and "decompression_bomb 2" in run.stderr  # printed, never silent
    assert f"report of written and skipped files in {out / '_write_report.json'}" in run.stdout
    report = json.loads((out / "_write_report.json").read_text())
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        "decompression_bomb": 2,
        "unsupported_extension": 2,
        "not_an_image": 2,
        "corrupt_image": 1,
        "stray_file": 1,
    }
    assert report["written"] == {"train": 9} and report["skipped_total"] == 8
    examples = {k: " ".join(v["examples"]) for k, v in report["skipped"].items()}
    assert "fake.jpg: PIL cannot identify" in examples["not_an_image"] and "._good0.jpg" in examples["not_an_image"]
    assert "trunc.jpg: OSError: image file is truncated" in examples["corrupt_image"]
    assert "bomb.png" in examples["decompression_bomb"] and "bomb_warn.png" in examples["decompression_bomb"]
    assert "notes.txt" in examples["unsupported_extension"] and ".DS_Store" in examples["unsupported_extension"]
    index = read_index(out)
    assert index.split("train").class_counts == (4, 5) and index.image_format == "jpg+png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left
    again = write_imagefolder(tmp_path / "again", source=tmp_path / "src", val_frac=0.0, workers=0)
    assert [s.sha256 for s in again.split("train").shards] == [s.sha256 for s in index.split("train").shards]

    # the 16-bit images as the loader decodes the copied bytes, with both decoders, pixel for pixel
    files = _members(out)
    assert set(files) == {f"good{i}.jpg" for i in range(4)} | {"grey16.png", "ramp16.png", "rgb16.png", "cmyk.jpg",
                                                              "pal.png"}  # fmt: skip
    assert files["ramp16.png"] == (tmp_path / "src" / "b" / "ramp16.png").read_bytes()  # copied, not re-encoded
    want = np.round(RAMP16 / 257).astype(np.uint8)
    for decode in (lambda d: np.asarray(decode_rgb(d)), lambda d: _decode_tv(d).permute(1, 2, 0).numpy()):
        ramp = decode(files["ramp16.png"])
        assert ramp.shape == (6, 8, 3) and (ramp == want[..., None]).all()
        assert (decode(files["rgb16.png"]) == [200, 30, 7]).all()
        assert np.abs(decode(files["cmyk.jpg"]).astype(int) - [255, 0, 0]).max() <= 3
        pal = decode(files["pal.png"])
        assert pal[0, 0].tolist() == [255, 255, 255] and pal[1, 1].tolist() == [255, 0, 0]  # transparent -> white

    # and through the real loader: the uniform 16-bit image arrives as 16 in every pixel, not as 255
    for decoder in ("pil", "torchvision"):
        cfg = data_cfg(out, num_workers=0, val_split="train", decoder=decoder, mean=(0, 0, 0), std=(1, 1, 1))
        val = build_val_loader(cfg, rank=0, world_size=1, batch_size=16, image_size=SIZE, with_keys=True)
        images, labels, keys = next(iter(val))
        paths = {i: json.loads(_meta_of(out, "train", k))["path"] for i, k in enumerate(keys) if k}  # "": padding
        grey = [i for i, p in paths.items() if p.endswith("grey16.png")]
        assert len(paths) == 9
        assert len(grey) == 1 and labels[grey[0]] == 1
        assert (images[grey[0]] * 255).round().unique().tolist() == [round(GREY16 / 257)]


def test_strict_aborts_and_leaves_nothing(tmp_path):
    _bad_tree(tmp_path / "src")
    run = _cli("--out", str(tmp_path / "out"), str(tmp_path / "src"), "--strict")
    assert run.returncode == 1
    assert f"error: {tmp_path / 'src' / '.DS_Store'}: not inside a class folder (stray_file" in run.stderr
    assert "--strict stops at the first bad file and writes nothing" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # a bad image found only while writing (after the scan) also leaves nothing behind
    (tmp_path / "src" / ".DS_Store").unlink()
    for p in [*(tmp_path / "src").rglob("*.txt"), *(tmp_path / "src").rglob(".DS_Store")]:
        p.unlink()
    run = _cli("--out", str(tmp_path / "out"), str(tmp_path / "src"), "--strict", "--val-frac", "0", "--workers", "2")
    assert run.returncode == 1 and "--strict stops at the first bad file" in run.stderr
    assert any(kind in run.stderr for kind in ("(not_an_image", "(corrupt_image", "(decompression_bomb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_write_keeps_the_previous_data_set(tmp_path, monkeypatch):
    from pipeline.data import writer

    _tree(tmp_path / "src", {"blue": 6, "red": 4})
    out = tmp_path / "out"
    before = write_imagefolder(out, source=tmp_path / "src", val_frac=0.0)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_index(index):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(writer, "write_index", broken_index)  # fails after every shard was written
    with pytest.raises(RuntimeError, match="injected"):
        write_imagefolder(out, source=tmp_path / "src", val_frac=0.5, overwrite=True)
    monkeypatch.undo()
    calls, real_load = [], writer.load_image

    def interrupted(path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the shards
        return real_load(path, **kw)

    monkeypatch.setattr(writer, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_imagefolder(out, source=tmp_path / "src", val_frac=0.5, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot and _leftovers(tmp_path) == []
    assert read_index(out).split("train").samples == before.split("train").samples == 10
    # a successful overwrite replaces it as a whole, at the end
    after = write_imagefolder(out, source=tmp_path / "src", val_frac=0.5, overwrite=True, seed=3)
    assert (after.split("train").samples, after.split("val").samples) == (5, 5)
    assert sorted(p.name for p in out.iterdir()) == [
        "_info.json", "_write_report.json", "train-000000.tar", "val-000000.tar"
    ]  # fmt: skip
    assert _leftovers(tmp_path) == []
    (out / "notes.md").write_text("mine")
    with pytest.raises(PreflightError, match=r"holds files that are not part of a shard data set \(notes.md\)"):
        write_imagefolder(out, source=tmp_path / "src", overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "_info.json").is_file()


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for i in range(1500):
        Image.fromarray(np.roll(noise, i)).save(src / "x" / f"{i:04d}.png", compress_level=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.data", "write", "--out", str(tmp_path / "out"), str(src),
         "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not _leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert _leftovers(tmp_path), "the write never started its temporary directory"
    time.sleep(0.05)  # into the shards (decoding 1,500 images takes far longer)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_val_source_is_the_val_split(tmp_path):
    _tree(tmp_path / "train", {"blue": 6, "red": 4})
    _tree(tmp_path / "val", {"blue": 2, "red": 3})
    out = tmp_path / "out"
    run = _cli("--out", str(out), str(tmp_path / "train"), "--val-source", str(tmp_path / "val"))
    assert run.returncode == 0, run.stderr
    index = read_index(out)
    assert index.classes == ("blue", "red") and index.val_frac == 0.0
    assert index.source == {"kind": "imagefolder", "path": str(tmp_path / "train"), "val_path": str(tmp_path / "val")}
    assert (index.split("train").class_counts, index.split("val").class_counts) == ((6, 4), (2, 3))
    val_paths = {json.loads(_meta_of(out, "val", k))["path"] for k in split_keys(out, "val")}
    assert val_paths == {str(p) for p in (tmp_path / "val").rglob("*.*")}
    train_paths = {json.loads(_meta_of(out, "train", k))["path"] for k in split_keys(out, "train")}
    assert train_paths == {str(p) for p in (tmp_path / "train").rglob("*.*")}  # nothing held out
    # a val tree with fewer classes is fine (labelled by name); one with a class train lacks is an error naming it
    shutil.rmtree(tmp_path / "val" / "blue")
    only_red = write_imagefolder(tmp_path / "o2", source=tmp_path / "train", val_source=tmp_path / "val")
    assert only_red.split("val").class_counts == (0, 3)
    _tree(tmp_path / "val", {"green": 1})
    run = _cli("--out", str(tmp_path / "o3"), str(tmp_path / "train"), "--val-source", str(tmp_path / "val"))
    assert run.returncode == 1 and "val class 'green' is not a train class (1 such: green)" in run.stderr
    flat = tmp_path / "flat_val"  # ImageNet's val folder as it is downloaded: 50,000 images, no class folders
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(PreflightError, match=r"images directly in the root .*ImageNet's val folder comes flat"):
        write_imagefolder(tmp_path / "o5", source=tmp_path / "train", val_source=flat)
    with pytest.raises(PreflightError, match="drop --val-frac 0.2"):
        write_imagefolder(tmp_path / "o4", source=tmp_path / "train", val_source=tmp_path / "val", val_frac=0.2)
    assert not any((tmp_path / name).exists() for name in ("o3", "o4", "o5")) and _leftovers(tmp_path) == []


def _meta_of(out: Path, split: str, key: str) -> bytes:
    for shard in read_index(out).split(split).shards:
        with tarfile.open(out / shard.name) as tf:
            if f"{key}.json" in tf.getnames():
                return tf.extractfile(f"{key}.json").read()
    raise KeyError(key)


def test_to_rgb_scales_wide_modes_and_composites_alpha_over_white():
    def px(img: Image.Image) -> list[list[int]]:
        return np.asarray(to_rgb(img)).reshape(-1, 3).tolist()

    wide = np.array([[0, 4000, 32896, 65535]], dtype=np.uint16)
    assert px(Image.fromarray(wide)) == [[v] * 3 for v in (0, 16, 128, 255)]  # I;16 (PIL alone: 0, 255, 255, 255)
    big_endian = Image.frombytes("I;16B", (4, 1), wide.astype(">u2").tobytes())
    assert px(big_endian) == [[v] * 3 for v in (0, 16, 128, 255)]
    assert px(Image.fromarray(np.array([[-5, 257, 65535, 70000]], dtype=np.int32))) == [
        [v] * 3 for v in (0, 1, 255, 255)
    ]
    assert px(Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32))) == [
        [v] * 3 for v in (0, 128, 255, 255)
    ]
    assert px(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == [[255, 0, 0]]
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    assert px(one) == [[0, 0, 0], [255, 255, 255]]
    assert px(Image.new("L", (1, 1), 77)) == [[77, 77, 77]]
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    assert px(la) == [[100, 100, 100], [255, 255, 255]]
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 51))  # 20 % black over white: 255 * 0.8 = 204
    assert px(rgba) == [[10, 20, 30], [255, 255, 255], [204, 204, 204]]
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 200, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    assert px(pal) == [[0, 200, 0], [255, 255, 255]]
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # the common case costs nothing
    premultiplied = np.asarray(to_rgb(Image.new("La", (1, 1), (50, 128)))).astype(int)  # L 99 at alpha 128
    assert np.abs(premultiplied - (99 * 128 + 255 * 127) / 255).max() <= 1  # PIL's own La -> RGB raises


def test_list_file_separators_tab_or_last_comma_and_bad_lines_reported(tmp_path):
    _tree(tmp_path / "a,b", {"blue": 2, "red": 2})  # a folder name with a comma in it
    tabs = tmp_path / "tabs.tsv"
    tabs.write_text(
        "# path<TAB>label: labels may hold commas\n"
        "a,b/blue/0.jpg\ttench, Tinca tinca\n"
        "a,b/blue/1.png\ttench, Tinca tinca\n"
        "a,b/red/0.jpg\tgoldfish\n"
        "a,b/red/9.jpg\tgoldfish\n"  # missing
        "a,b/notes.txt\tgoldfish\n"  # not an image file name
    )
    (tmp_path / "a,b" / "notes.txt").write_text("x")
    index = write_imagefolder(tmp_path / "o1", source=tabs, val_frac=0.0)
    assert index.classes == ("goldfish", "tench, Tinca tinca") and index.split("train").class_counts == (1, 2)
    report = read_report(tmp_path / "o1")
    assert {k: v["count"] for k, v in report["skipped"].items()} == {"missing_file": 1, "unsupported_extension": 1}
    assert report["skipped"]["missing_file"]["examples"][0].startswith(f"{tabs}:5: ")
    commas = tmp_path / "commas.csv"
    commas.write_text("a,b/blue/0.jpg,1\na,b/red/1.png,0\n")  # the last comma splits: paths may hold commas
    index = write_imagefolder(tmp_path / "o2", source=commas, val_frac=0.0)
    assert index.classes == ("0", "1") and index.split("train").class_counts == (1, 1)
    assert read_report(tmp_path / "o2")["skipped_total"] == 0
    commas.write_text("ab/blue/0.jpg 1\n")  # a space separates nothing
    with pytest.raises(PreflightError, match=r"commas.csv:1: expected 'path<TAB>label' or 'path,label'"):
        write_imagefolder(tmp_path / "o3", source=commas)
    commas.write_text("a,b/blue/0.jpg 1\n")  # here the comma splits: the file is missing, and the hint says why
    with pytest.raises(PreflightError, match=r"commas.csv:1: .*/a is not an existing file \(split at the last comma"):
        write_imagefolder(tmp_path / "o3", source=commas)


def test_resize_converts_odd_modes_before_re_encoding(tmp_path):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "x" / "grey16.png").write_bytes(_png16(np.full((10, 20), GREY16, dtype=np.uint16)))
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(src / "x" / "clear.png")  # transparent black: white
    (src / "x" / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (20, 10), (0, 255, 255, 0))))
    index = write_imagefolder(tmp_path / "out", source=src, val_frac=0.0, resize=5, image_format="png")
    assert index.image_format == "png" and index.split("train").samples == 3
    files = {name: np.asarray(decode_rgb(data)) for name, data in _members(tmp_path / "out").items()}
    assert {name: a.shape for name, a in files.items()} == {
        n: (5, 10, 3) for n in ("grey16.png", "clear.png", "cmyk.jpg")
    }
    assert (files["grey16.png"] == round(GREY16 / 257)).all() and (files["clear.png"] == 255).all()
    assert (files["cmyk.jpg"] == [255, 0, 0]).all()  # the JPEG's one flat colour, re-encoded losslessly
