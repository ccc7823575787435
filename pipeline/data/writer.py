"""Write shard data sets: synthetic, scikit-learn's digits, or an ImageFolder tree / list file.

Every writer goes through :func:`write_samples`: seeded train/val split, samples shuffled before they
are written (a shard is a random mix of classes), webdataset's ``ShardWriter`` (``maxcount`` /
``maxsize``, members ``<key>.jpg|png|webp``, ``<key>.cls``, optional ``<key>.json``), a fixed tar
mtime (the same input gives byte-identical shards), and the index written last and atomically.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.errors import PreflightError
from pipeline.data.index import INDEX_NAME, DataIndex, ShardInfo, SplitInfo, sha256_file, write_index
from pipeline.data.synthetic import class_names, draw

log = logging.getLogger(__name__)

ImageFormat = Literal["jpg", "png", "webp"]
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_SHARD_COUNT = 1000
DEFAULT_SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class Item:
    """One sample to write: its label and how to produce its bytes (called once, when written)."""

    key: str
    label: int
    render: Callable[[], tuple[bytes, str]]  # -> (image bytes, extension)
    meta: dict[str, Any] | None = None


def encode(array: np.ndarray, fmt: ImageFormat, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, _PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two data sets in one directory; with ``overwrite`` the index goes first."""
    old = [p for p in out.glob("*.tar")] + ([out / INDEX_NAME] if (out / INDEX_NAME).exists() else [])
    if old and not overwrite:
        raise PreflightError(
            f"{out} already holds a data set ({len(old)} files, e.g. {old[0].name}); pass --overwrite "
            f"(overwrite=True) to replace it, or choose another --out"
        )
    if (out / INDEX_NAME).exists():
        (out / INDEX_NAME).unlink()  # a crash from here on leaves no index, never a stale one
    for p in old:
        p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_split(
    out: Path, split: str, items: Sequence[Item], *, max_count: int, max_bytes: int, bar: tqdm
) -> list[ShardInfo]:
    shards: list[ShardInfo] = []
    if not items:
        return shards
    writer = wds.ShardWriter(
        str(out / f"{split}-%06d.tar"), maxcount=max_count, maxsize=max_bytes, verbose=0, encoder=False, mtime=0
    )

    def finished(fname: str) -> None:
        p = Path(fname)
        shards.append(ShardInfo(p.name, writer.count, p.stat().st_size, sha256_file(p)))

    writer.post = finished
    with writer:
        for item in items:
            data, ext = item.render()
            sample = {"__key__": item.key, ext: data, "cls": str(item.label).encode()}
            if item.meta is not None:
                sample["json"] = json.dumps(item.meta).encode()
            writer.write(sample)
            bar.update()
    return shards


def write_samples(
    out: str | Path,
    items: Sequence[Item],
    *,
    classes: Sequence[str],
    source: dict[str, Any],
    image_format: str,
    image_size: tuple[int, int] | None,
    seed: int = 0,
    val_frac: float = 0.1,
    shard_max_count: int = DEFAULT_SHARD_COUNT,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> DataIndex:
    """Split ``items`` (seeded), write train-*.tar / val-*.tar and the index; return the index."""
    if not 0 <= val_frac < 1:
        raise PreflightError(f"val_frac must be in [0, 1), got {val_frac}")
    if shard_max_count < 1 or shard_max_bytes < 1:
        raise PreflightError("shard_max_count and shard_max_bytes must be >= 1")
    if not items:
        raise PreflightError(f"no samples to write to {out}: the source is empty")
    out = Path(out)
    _prepare_out(out, overwrite)
    order = np.random.default_rng([seed & (2**63 - 1), 0x5B17]).permutation(len(items))
    n_val = int(round(len(items) * val_frac))
    parts = {"val": [items[i] for i in order[:n_val]], "train": [items[i] for i in order[n_val:]]}
    splits = {}
    with tqdm(total=len(items), desc=f"writing {out}", unit="img", disable=not progress) as bar:
        for name in ("train", "val"):
            shards = _write_split(out, name, parts[name], max_count=shard_max_count, max_bytes=shard_max_bytes, bar=bar)
            if shards:
                counts = np.bincount([it.label for it in parts[name]], minlength=len(classes))
                splits[name] = SplitInfo(name, tuple(shards), tuple(int(c) for c in counts))
    index = DataIndex(
        root=out,
        classes=tuple(classes),
        splits=splits,
        image_format=image_format,
        image_size=image_size,
        source=source,
        seed=seed,
        val_frac=val_frac,
    )
    write_index(index)
    log.info(
        "wrote %s: %s", out, ", ".join(f"{k} {v.samples} samples / {len(v.shards)} shards" for k, v in splits.items())
    )
    return index


def write_synthetic(
    out: str | Path,
    *,
    n: int,
    classes: int,
    size: int,
    seed: int = 0,
    val_frac: float = 0.1,
    shard_max_count: int = DEFAULT_SHARD_COUNT,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    image_format: ImageFormat = "jpg",
    quality: int = 90,
    overwrite: bool = False,
    progress: bool = False,
) -> DataIndex:
    """``n`` procedurally drawn images of ``classes`` learnable classes, ``size`` x ``size`` pixels."""
    if n < 1 or classes < 1 or size < 4:
        raise PreflightError(f"synthetic data needs n >= 1, classes >= 1, size >= 4; got {n}, {classes}, {size}")

    def item(i: int) -> Item:
        label = i % classes  # balanced classes
        return Item(
            f"syn{i:08d}",
            label,
            lambda: (
                encode(draw(i, label, classes=classes, size=size, seed=seed), image_format, quality),
                image_format,
            ),
        )

    source = {"kind": "synthetic", "n": n, "classes": classes, "size": size}
    return write_samples(
        out,
        [item(i) for i in range(n)],
        classes=class_names(classes),
        source=source,
        image_format=image_format,
        image_size=(size, size),
        seed=seed,
        val_frac=val_frac,
        shard_max_count=shard_max_count,
        shard_max_bytes=shard_max_bytes,
        overwrite=overwrite,
        progress=progress,
    )


def write_digits(
    out: str | Path,
    *,
    size: int = 32,
    seed: int = 0,
    val_frac: float = 0.2,
    shard_max_count: int = 500,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    image_format: ImageFormat = "jpg",
    quality: int = 95,
    overwrite: bool = False,
    progress: bool = False,
) -> DataIndex:
    """scikit-learn's bundled digits (1,797 real 8x8 grey images, 10 classes), resized to ``size``."""
    images, targets = _load_digits()
    pixels = (images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255

    def item(i: int) -> Item:
        def render() -> tuple[bytes, str]:
            img = Image.fromarray(pixels[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            return encode(np.asarray(img), image_format, quality), image_format

        return Item(f"digit{i:05d}", int(targets[i]), render)

    return write_samples(
        out,
        [item(i) for i in range(len(pixels))],
        classes=[str(d) for d in range(10)],
        source={"kind": "digits", "size": size},
        image_format=image_format,
        image_size=(size, size),
        seed=seed,
        val_frac=val_frac,
        shard_max_count=shard_max_count,
        shard_max_bytes=shard_max_bytes,
        overwrite=overwrite,
        progress=progress,
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) pixels 0..16 and labels; reads scikit-learn's bundled file without importing sklearn.

    ``load_digits`` reads the same file; importing sklearn costs seconds that test fixtures would pay.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")  # 64 pixels, then the label
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def write_imagefolder(
    out: str | Path,
    *,
    source: str | Path,
    seed: int = 0,
    val_frac: float = 0.1,
    shard_max_count: int = DEFAULT_SHARD_COUNT,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    resize: int = 0,
    image_format: ImageFormat = "jpg",
    quality: int = 90,
    overwrite: bool = False,
    progress: bool = False,
) -> DataIndex:
    """Images from ``source/<class>/<img>`` or a ``path,label`` list file.

    With ``resize=0`` the image bytes are copied as they are (checked to open); with ``resize=S`` each
    image is re-encoded as ``image_format`` with its shorter side scaled to S.
    """
    src = Path(source)
    if src.is_dir():
        entries, classes = _scan_tree(src)
    elif src.is_file():
        entries, classes = _read_list(src)
    else:
        raise PreflightError(f"image source {src} does not exist; pass an ImageFolder root or a path,label list file")

    def item(i: int, path: Path, label: int) -> Item:
        return Item(
            f"img{i:09d}",
            label,
            lambda: _load_image(path, resize, image_format, quality),
            {"path": str(path), "class": classes[label]},
        )

    items = [item(i, p, y) for i, (p, y) in enumerate(entries)]
    fmt = image_format if resize else "+".join(sorted({IMAGE_SUFFIXES[p.suffix.lower()] for p, _ in entries}))
    return write_samples(
        out,
        items,
        classes=classes,
        source={"kind": "imagefolder", "path": str(src)},
        image_format=fmt,
        image_size=None,
        seed=seed,
        val_frac=val_frac,
        shard_max_count=shard_max_count,
        shard_max_bytes=shard_max_bytes,
        overwrite=overwrite,
        progress=progress,
    )


def _scan_tree(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    stray = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise PreflightError(
            f"{root}: images directly in the root ({', '.join(stray[:3])}); an ImageFolder tree keeps each "
            f"class in its own folder: {root}/<class>/<image>"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise PreflightError(f"{root}: no class folders; expected {root}/<class>/<image>.jpg")
    entries = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PreflightError(
                f"{root / name}: class folder with no .jpg/.jpeg/.png/.webp image; add images or remove it"
            )
        entries += [(p, label) for p in files]
    return entries, classes


def _read_list(file: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``path,label`` lines (``#`` comments and blank lines skipped); labels all integers or all names."""
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, sep, label = line.rpartition(",")
        if not sep or not path.strip() or not label.strip():
            raise PreflightError(f"{file}:{n}: expected 'path,label', got {line!r}")
        p = Path(path.strip())
        p = p if p.is_absolute() else file.parent / p
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            raise PreflightError(f"{file}:{n}: {p} is not an existing .jpg/.jpeg/.png/.webp file")
        rows.append((n, p, label.strip()))
    if not rows:
        raise PreflightError(f"{file}: no 'path,label' lines")
    numeric = [r for r in rows if r[2].isdigit()]
    if numeric and len(numeric) != len(rows):
        n, _, label = next(r for r in rows if not r[2].isdigit())
        raise PreflightError(
            f"{file}:{n}: wrong label type {label!r}: the other labels are class indices (non-negative integers); "
            f"use all integers or all class names"
        )
    if numeric:
        classes = [str(i) for i in range(max(int(r[2]) for r in rows) + 1)]
        return [(p, int(label)) for _, p, label in rows], classes
    classes = sorted({r[2] for r in rows})
    return [(p, classes.index(label)) for _, p, label in rows], classes


def _load_image(path: Path, resize: int, fmt: ImageFormat, quality: int) -> tuple[bytes, str]:
    try:
        with Image.open(path) as img:
            if not resize:
                img.verify()  # catch a broken source image now, not mid-training
                return path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()]
            img = img.convert("RGB")
            scale = resize / min(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            return encode(np.asarray(img), fmt, quality), fmt
    except (OSError, SyntaxError, ValueError) as e:
        raise PreflightError(f"{path}: not a readable image ({e}); remove it from the source or replace it") from None
