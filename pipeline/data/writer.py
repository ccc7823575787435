"""Write shard data sets: synthetic, scikit-learn's digits, or an ImageFolder tree / list file.

Every writer goes through :func:`write_samples`: seeded train/val split, samples shuffled before they
are written (a shard is a random mix of classes), webdataset's ``ShardWriter`` (``maxcount`` /
``maxsize``, members ``<key>.jpg|png|webp``, ``<key>.cls``, optional ``<key>.json``), a fixed tar
mtime (the same input gives byte-identical shards), and the index written last. The whole data set
is written into a temporary directory beside ``out`` and renamed to ``out`` at the end: a failed or
interrupted write (an exception, Ctrl-C, SIGTERM, a ``strict`` stop) leaves nothing half-written, and
``overwrite`` replaces an existing data set only at that rename.

ImageFolder and list-file sources (read by :mod:`pipeline.data.sources`, in ``workers`` processes)
decode every image fully (PIL's ``verify()`` passes truncated JPEGs). A file that cannot be written
(not an image, truncated, a decompression bomb, an extension or pixel mode we cannot write) is
skipped and counted by kind, with examples, in the log and in ``out/_write_report.json``;
``strict=True`` stops at the first one instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.errors import PreflightError
from pipeline.data.index import INDEX_NAME, DataIndex, ShardInfo, SplitInfo, sha256_file, write_index
from pipeline.data.sources import (
    REPORT_NAME,
    BadImage,
    ImageFormat,
    Rendered,
    WriteReport,
    encode,
    ignore_sigint,
    load_image,
    read_source,
    read_val_source,
    render_all,
)
from pipeline.data.synthetic import class_names, draw
from pipeline.durable import fsync_path

log = logging.getLogger(__name__)

DEFAULT_SHARD_COUNT = 1000
DEFAULT_SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class Item:
    """One sample to write: its label and how to produce its bytes (called once, when written)."""

    key: str
    label: int
    render: Callable[[], tuple[bytes, str]]  # -> (image bytes, extension); may raise BadImage
    meta: dict[str, Any] | None = None


def _is_dataset_file(name: str) -> bool:
    return name.endswith(".tar") or name in (INDEX_NAME, REPORT_NAME) or name.startswith(f".{INDEX_NAME}.")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a data set, and a data set without ``overwrite``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PreflightError(f"--out {out} is a file; give a directory path for the data set")
    names = sorted(p.name for p in out.iterdir())
    ours = [n for n in names if _is_dataset_file(n)]
    if ours and not overwrite:
        raise PreflightError(
            f"{out} already holds a data set ({len(ours)} files, e.g. {ours[0]}); pass --overwrite "
            f"(overwrite=True) to replace it, or choose another --out"
        )
    other = [n for n in names if not _is_dataset_file(n)]
    if other:
        raise PreflightError(
            f"{out} holds files that are not part of a shard data set ({', '.join(other[:3])}); a write replaces "
            f"the whole directory, so choose a new or empty --out, or move those files out"
        )


@contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh directory beside ``out``: renamed to ``out`` if the block ends normally, else removed."""
    target = out.resolve()  # `--out .` or a symlink: stage beside the real directory, on its file system
    stale = sorted(target.parent.glob(f".{target.name}.writing-*")) if target.parent.is_dir() else []
    if stale:  # SIGKILL (or a power cut) gives no chance to clean up
        log.warning("left by an earlier write that was killed: %s; delete them", ", ".join(map(str, stale)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.writing-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise PreflightError(
            f"cannot create a temporary directory beside {out} ({e}); the writer builds the data set next to "
            f"--out and renames it into place, so the folder holding --out must be writable"
        ) from None
    restore = _sigterm_as_exit()
    try:
        yield tmp
        fsync_path(tmp)
        _check_out(target, overwrite)  # again: another write may have finished there meanwhile
        _swap_in(tmp, target)
    except BaseException:  # also Ctrl-C and SIGTERM (below): nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore()


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists():  # a data set being replaced (checked) or an empty directory
        old = out.with_name(f".{out.name}.replaced-{secrets.token_hex(4)}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    fsync_path(out.parent)


def _sigterm_as_exit() -> Callable[[], None]:
    """While writing, SIGTERM (SLURM's time limit, `kill`) unwinds like Ctrl-C so the temporary data is removed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)

    def exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_term)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_CHUNK = 16  # renders per task sent to a worker process


def _rendered(items: Sequence[Item], pool: ProcessPoolExecutor | None, workers: int) -> Iterator[Rendered]:
    """Each item's render result, in order (the shards stay byte-identical whatever ``workers`` is).

    At most 2 x ``workers`` chunks are in flight, so memory stays bounded on millions of images.
    """
    if pool is None:
        for item in items:
            yield from render_all([item.render])
        return
    window: deque[Future[list[Rendered]]] = deque()
    try:
        for i in range(0, len(items), _CHUNK):
            window.append(pool.submit(render_all, [it.render for it in items[i : i + _CHUNK]]))
            if len(window) >= 2 * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()
    except BrokenProcessPool:
        raise PreflightError(
            "a render worker process died: killed (out of memory?), or started from a script without the "
            '`if __name__ == "__main__":` guard (workers start from a forkserver, which imports the main module); '
            "add the guard, or write with --workers 0 (workers=0)"
        ) from None
    finally:
        for future in window:
            future.cancel()


@contextmanager
def _render_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    if workers <= 0:
        yield None
        return
    # forkserver, as the loader's workers: forking a process that runs threads (tqdm's) can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=ignore_sigint)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_split(
    out: Path,
    split: str,
    items: Sequence[Item],
    rendered: Iterator[Rendered],
    *,
    max_count: int,
    max_bytes: int,
    bar: tqdm,
    report: WriteReport,
) -> tuple[list[ShardInfo], list[int], set[str]]:
    """Write ``items`` as ``split-NNNNNN.tar``: (shards, labels written, image extensions written)."""
    shards: list[ShardInfo] = []
    labels: list[int] = []
    exts: set[str] = set()
    if not items:
        return shards, labels, exts
    writer = wds.ShardWriter(
        str(out / f"{split}-%06d.tar"), maxcount=max_count, maxsize=max_bytes, verbose=0, encoder=False, mtime=0
    )

    def finished(fname: str) -> None:
        p = Path(fname)
        if writer.count == 0:  # the split's every sample was skipped (ShardWriter opens its first tar at once)
            p.unlink()
            return
        with open(p, "rb") as f:
            os.fsync(f.fileno())  # on disk before the directory is renamed into place
        shards.append(ShardInfo(p.name, writer.count, p.stat().st_size, sha256_file(p)))

    writer.post = finished
    with writer:
        for item, result in zip(items, rendered, strict=True):
            bar.update()
            if isinstance(result, BadImage):
                report.skip(result)
                continue
            data, ext = result
            sample = {"__key__": item.key, ext: data, "cls": str(item.label).encode()}
            if item.meta is not None:
                sample["json"] = json.dumps(item.meta).encode()
            writer.write(sample)
            labels.append(item.label)
            exts.add(ext)
    return shards, labels, exts


def _split(
    items: Sequence[Item], val_items: Sequence[Item] | None, *, seed: int, val_frac: float
) -> dict[str, list[Item]]:
    order = np.random.default_rng([seed & (2**63 - 1), 0x5B17]).permutation(len(items))
    if val_items is not None:  # a val set of its own: no hold-out from train
        val_order = np.random.default_rng([seed & (2**63 - 1), 0x5B17, 1]).permutation(len(val_items))
        return {"train": [items[i] for i in order], "val": [val_items[i] for i in val_order]}
    n_val = int(round(len(items) * val_frac))
    return {"train": [items[i] for i in order[n_val:]], "val": [items[i] for i in order[:n_val]]}


def _write_parts(
    out: Path,
    parts: dict[str, list[Item]],
    *,
    num_classes: int,
    max_count: int,
    max_bytes: int,
    report: WriteReport,
    workers: int,
    progress: bool,
    desc: str,
) -> tuple[dict[str, SplitInfo], set[str]]:
    """Write every split: (the splits that got samples, the image extensions written)."""
    splits, exts = {}, set()
    total = sum(map(len, parts.values()))
    with (
        _render_pool(workers) as pool,
        tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar,
    ):
        for name, part in parts.items():
            rendered = _rendered(part, pool, workers)
            shards, labels, split_exts = _write_split(
                out, name, part, rendered, max_count=max_count, max_bytes=max_bytes, bar=bar, report=report
            )
            if part:
                report.written[name] = len(labels)
            exts |= split_exts
            if shards:
                counts = np.bincount(labels, minlength=num_classes)
                splits[name] = SplitInfo(name, tuple(shards), tuple(int(c) for c in counts))
    return splits, exts


def write_samples(
    out: str | Path,
    items: Sequence[Item],
    *,
    classes: Sequence[str],
    source: dict[str, Any],
    image_size: tuple[int, int] | None,
    seed: int = 0,
    val_frac: float = 0.1,
    val_items: Sequence[Item] | None = None,
    shard_max_count: int = DEFAULT_SHARD_COUNT,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    report: WriteReport | None = None,
    workers: int = 0,
) -> DataIndex:
    """Split ``items`` (seeded; or train = ``items``, val = ``val_items``), write the shards and the index.

    With ``report`` (image sources), files that fail to render are skipped into it and it is saved
    beside the index; the index's class counts and image format are those of what was written.
    ``workers`` > 0 renders (decodes, re-encodes) in that many processes; renders must then pickle.
    """
    if not 0 <= val_frac < 1:
        raise PreflightError(f"val_frac must be in [0, 1), got {val_frac}")
    if val_items is not None and val_frac:
        raise PreflightError("a separate val set and val_frac > 0 exclude each other: drop --val-frac")
    if shard_max_count < 1 or shard_max_bytes < 1:
        raise PreflightError("shard_max_count and shard_max_bytes must be >= 1")
    if not items:
        raise PreflightError(f"no samples to write to {out}: the source is empty")
    out = Path(out)
    _check_out(out, overwrite)  # before the work; _staged checks again before its rename
    parts = _split(items, val_items, seed=seed, val_frac=val_frac)
    tally = report if report is not None else WriteReport(source=str(source))
    with _staged(out, overwrite) as tmp:
        splits, exts = _write_parts(
            tmp,
            parts,
            num_classes=len(classes),
            max_count=shard_max_count,
            max_bytes=shard_max_bytes,
            report=tally,
            workers=workers,
            progress=progress,
            desc=f"writing {out}",
        )
        if not splits:
            raise PreflightError(f"nothing written to {out}: every sample was skipped. {tally.summary()}")
        index = DataIndex(
            root=tmp,
            classes=tuple(classes),
            splits=splits,
            image_format="+".join(sorted(exts)),
            image_size=image_size,
            source=source,
            seed=seed,
            val_frac=val_frac,
        )
        write_index(index)
        if report is not None:
            report.save(tmp)
    if report is not None:
        (log.warning if report.skipped else log.info)("%s; report: %s", report.summary(), out / REPORT_NAME)
    log.info(
        "wrote %s: %s", out, ", ".join(f"{k} {v.samples} samples / {len(v.shards)} shards" for k, v in splits.items())
    )
    return replace(index, root=out)


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
    val_source: str | Path | None = None,
    seed: int = 0,
    val_frac: float | None = None,
    shard_max_count: int = DEFAULT_SHARD_COUNT,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    resize: int = 0,
    image_format: ImageFormat = "jpg",
    quality: int = 90,
    strict: bool = False,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> DataIndex:
    """Images from ``source/<class>/<img>`` or a list file (``path<TAB>label`` or ``path,label`` lines).

    ``val_source`` (a tree or list file, e.g. ImageNet's val folder beside its train folder) is the val
    split, labelled with ``source``'s classes; no hold-out is taken from ``source`` then (``val_frac``
    defaults to 0.1 without it). With ``resize=0`` each image's bytes are copied as they are (after a
    full decode); with ``resize=S`` each image is converted to RGB (:func:`pipeline.data.pixels.to_rgb`)
    and re-encoded as ``image_format`` with its shorter side scaled to S. Files that cannot be written
    are skipped and reported (``out/_write_report.json``, the log); ``strict`` stops at the first one
    and writes nothing.
    ``workers`` processes decode (the full decode costs milliseconds per image; 0: in this process).
    """
    if val_source is not None and val_frac:
        raise PreflightError(
            f"--val-source {val_source} is the val split; drop --val-frac {val_frac} (it would also hold out "
            f"part of the train images)"
        )
    _check_out(Path(out), overwrite)  # before a scan of a million files, not after
    src = Path(source)
    report = WriteReport(source=str(src), val_source=None if val_source is None else str(val_source), strict=strict)
    entries, classes = read_source(src, report)
    val_entries = None if val_source is None else read_val_source(Path(val_source), classes, report)
    load = partial(load_image, resize=resize, fmt=image_format, quality=quality)

    def items(prefix: str, rows: list[tuple[Path, int]]) -> list[Item]:
        return [
            Item(f"{prefix}{i:09d}", y, partial(load, p), {"path": str(p), "class": classes[y]})
            for i, (p, y) in enumerate(rows)
        ]

    meta = {"kind": "imagefolder", "path": str(src)} | ({} if val_source is None else {"val_path": str(val_source)})
    return write_samples(
        out,
        items("img", entries),
        val_items=None if val_entries is None else items("val", val_entries),
        classes=classes,
        source=meta,
        image_size=None,
        seed=seed,
        val_frac=0.0 if val_source is not None else (0.1 if val_frac is None else val_frac),
        shard_max_count=shard_max_count,
        shard_max_bytes=shard_max_bytes,
        overwrite=overwrite,
        progress=progress,
        report=report,
        workers=workers,
    )
