"""Index shards written by anyone (webdataset's ShardWriter, GNU tar, img2dataset) where they lie.

    python -m pipeline.data index /datasets/in1k/train --val '/datasets/in1k/val-{0000..0049}.tar' \
        --out /scratch/me/in1k.json

Only tar headers are read, plus the small label members (``cls`` or ``json``): a seek over every
image, never its bytes. Shards are scanned in parallel processes. The samples are grouped exactly as
the reader groups them (:mod:`pipeline.data.tario`, the same header parser and key rule), so the
index's counts are the positions the loader will stream; samples that will be skipped at run time
(no image member, no usable label) are counted and reported here, by count and example.

sha256 is not recorded by default: hashing reads every byte of the data set (hours for ImageNet-21k
on a shared file system), while size + tar-header checks at preflight already catch the usual damage
(a truncated copy, a replaced file). ``--sha256`` records it when wanted.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import mmap
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand
from tqdm import tqdm

from pipeline.data.errors import PreflightError
from pipeline.data.index import CLS_LABELS, INDEX_NAME, DataIndex, LabelSpec, ShardInfo, SplitInfo, write_index
from pipeline.data.tario import (
    IMAGE_EXTS,
    Members,
    TarBroken,
    TarHeaders,
    cls_value,
    label_value,
    plain_members,
    split_name,
)

_MAX_LABEL_BYTES = 1 << 20  # a label member larger than this is not a label
_TAG_HOLDOUT = 0x4E1D


@dataclass
class ShardScan:
    """What one shard holds, from its headers and label members."""

    path: str
    bytes: int = 0
    samples: int = 0
    members: Counter = field(default_factory=Counter)  # extension -> count
    labels: Counter = field(default_factory=Counter)  # raw label value (int or class name) -> count
    unlabeled: int = 0  # samples without a usable label value
    no_image: int = 0  # samples without an image member (skipped as corrupt_image at run time)
    examples: list[str] = field(default_factory=list)  # a few keys of such samples
    sha256: str | None = None
    error: str | None = None  # the shard is damaged or not a tar; why


def _label_of(raw: bytes | None, label: LabelSpec) -> int | str | None:
    if raw is None:
        return None
    if label.kind == "cls":
        value = cls_value(raw)
        return value if value is not None and value >= 0 else None
    value = label_value(raw, label.field)
    return value if (type(value) is int and value >= 0) or isinstance(value, str) else None


def scan_shard(path: str, label: LabelSpec, sha256: bool = False) -> ShardScan:
    """Walk one shard's headers; group members into samples as :class:`tario.ShardReader` does."""
    scan = ShardScan(path)
    try:
        scan.bytes = os.path.getsize(path)
        with open(path, "rb") as f, _mapped(f, scan.bytes) as view:
            _walk(view, scan, label)
        if sha256 and scan.error is None:
            with open(path, "rb") as f:
                scan.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        scan.error = f"cannot read it ({e.strerror or e})"
    return scan


@contextlib.contextmanager
def _mapped(f: BinaryIO, size: int) -> Iterator[BinaryIO]:
    """The shard as a memory map: its seek/read are C calls, not system calls (2-3 per header otherwise)."""
    if size == 0:  # mmap refuses empty files; the walk reports them
        yield f
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view  # type: ignore[misc]


def _walk(f, scan: ShardScan, label: LabelSpec) -> None:
    """Group the members into samples (runs of one key) and count them; list operations where they can be."""
    names, offsets, sizes = _members(f, scan)
    if scan.error is not None or not names:
        return
    keys, exts = zip(*map(split_name, names), strict=True)
    scan.members.update(exts)
    firsts = [0, *(i for i in range(1, len(keys)) if keys[i] != keys[i - 1]), len(keys)]
    seen: set[str] = set()
    label_ext = label.member
    for first, end in itertools.pairwise(firsts):
        key = keys[first]
        if key in seen:
            scan.error = (
                f"the members of sample {key!r} are not consecutive (a webdataset sample is a run of members "
                f"sharing a key): re-create the tar with sorted names, e.g. `tar --sort=name -cf ...`"
            )
            return
        seen.add(key)
        raw = None
        for i in range(end - 1, first - 1, -1):  # the last label member of the sample counts
            if exts[i] == label_ext and sizes[i] <= _MAX_LABEL_BYTES:
                f.seek(offsets[i])
                raw = f.read(sizes[i])
                break
        _close_sample(scan, key, set(exts[first:end]), raw, label)


def _members(f, scan: ShardScan) -> Members:
    """The shard's members as columns: all at once on the fast path, else header by header (a damaged
    shard's error, where the walk stopped, goes to ``scan.error``)."""
    plain = plain_members(f) if isinstance(f, mmap.mmap) else None
    if plain is not None:
        return plain
    found, headers = [], TarHeaders(f)
    while True:
        try:
            member = headers.next()
        except (TarBroken, ValueError) as e:
            scan.error = f"{'not a tar archive: ' if headers.pos == 0 else 'damaged: '}{e}"
            member = None
        if member is None:
            return Members(*(list(column) for column in zip(*found, strict=True))) if found else Members([], [], [])
        found.append(member)


def _close_sample(scan: ShardScan, key: str, exts: set[str], raw: bytes | None, label: LabelSpec) -> None:
    scan.samples += 1
    if label.kind == "none":
        scan.unlabeled += 1  # an unlabeled data set: every sample
    elif (value := _label_of(raw, label)) is None:
        scan.unlabeled += 1
        _example(scan, f"{key} (no usable {label.describe()})")
    else:
        scan.labels[value] += 1
    if exts.isdisjoint(IMAGE_EXTS):
        scan.no_image += 1
        _example(scan, f"{key} (no {'/'.join(IMAGE_EXTS)} member, has {'/'.join(sorted(exts))})")


def _example(scan: ShardScan, what: str) -> None:
    if len(scan.examples) < 3:
        scan.examples.append(f"{Path(scan.path).name}: {what}")


# ---------------------------------------------------------------------------------------- sources


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Shard paths named by directories, files, globs and brace patterns, in the order given."""
    out: list[str] = []
    for source in sources:
        found: list[str] = []
        for pattern in braceexpand(source):
            if os.path.isdir(pattern):
                found += sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
            elif any(c in pattern for c in "*?["):
                found += sorted(glob.glob(pattern))
            elif os.path.isfile(pattern):
                found.append(pattern)
            else:
                raise PreflightError(
                    f"shard source {source!r}: {pattern} does not exist; give directories of .tar shards, shard "
                    f"files, globs ('DIR/*.tar') or brace patterns ('DIR/train-{{000000..000146}}.tar'), quoted so "
                    f"the shell leaves them alone"
                )
        if not found:
            raise PreflightError(f"shard source {source!r} names no .tar files; check the path or pattern")
        out += [os.path.abspath(p) for p in found]
    return out


def _check_distinct(train: list[str], val: list[str]) -> None:
    for what, paths in (("train", train), ("val", val)):
        twice = [p for p, n in Counter(paths).items() if n > 1]
        if twice:
            raise PreflightError(f"{len(twice)} {what} shards are named twice by the sources, e.g. {twice[0]}")
    both = sorted(set(train) & set(val))
    if both:
        raise PreflightError(
            f"{len(both)} shards are both train and val sources, e.g. {both[0]}; a val set must be separate data"
        )


# ------------------------------------------------------------------------------------------ scans


def _scan_job(args: tuple[str, LabelSpec, bool]) -> ShardScan:
    return scan_shard(*args)


def scan_all(paths: Sequence[str], label: LabelSpec, *, jobs: int, sha256: bool, progress: bool) -> list[ShardScan]:
    """Scans in path order; ``jobs`` processes (1: in this process)."""
    work = [(p, label, sha256) for p in paths]
    bar = tqdm(total=len(work), desc="indexing", unit="shard", disable=not progress)
    out: list[ShardScan] = []
    samples = 0
    pool = None
    try:
        if jobs <= 1 or len(work) < 2:
            results = map(_scan_job, work)
        else:
            # fork: a worker needs nothing but this module; the CLI process runs no threads
            pool = mp.get_context("fork").Pool(min(jobs, len(work)))
            results = pool.imap(_scan_job, work, chunksize=max(1, min(64, len(work) // (jobs * 8))))
        for scan in results:
            out.append(scan)
            samples += scan.samples
            bar.update()
            bar.set_postfix(samples=samples, refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return out


# ------------------------------------------------------------------------------------------ index


@dataclass
class IndexReport:
    index: DataIndex
    path: Path
    skipped_shards: list[str]  # damaged or empty shards left out (with --skip-damaged), with the reason
    notes: list[str]

    def summary(self) -> str:
        idx = self.index
        lines = [f"{self.path}: {idx.num_classes or 'no'} classes, labels from {idx.label.describe()}"]
        for name, info in idx.splits.items():
            seen = ", ".join(f"{k}={v}" for k, v in info.members().items())
            lines.append(f"  {name}: {info.samples} samples in {len(info.shards)} shards (members: {seen})")
        lines += [f"  left out: {s}" for s in self.skipped_shards]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def build_index(
    sources: Sequence[str],
    *,
    out: str | Path,
    val: Sequence[str] = (),
    val_frac: float = 0.0,
    seed: int = 0,
    label: LabelSpec = CLS_LABELS,
    classes_file: str | Path | None = None,
    jobs: int = 0,
    sha256: bool = False,
    skip_damaged: bool = False,
    progress: bool = False,
) -> IndexReport:
    """Scan the shards of ``sources`` (and ``val``), write the index to ``out``; return what was found."""
    out = Path(out).absolute()
    if out.is_dir():
        out = out / INDEX_NAME
    if val and val_frac:
        raise PreflightError("give either --val SOURCE... (a separate val set) or --val-frac, not both")
    if not 0 <= val_frac < 1:
        raise PreflightError(f"--val-frac must be in [0, 1), got {val_frac}")
    if not out.parent.is_dir():
        raise PreflightError(f"--out {out}: directory {out.parent} does not exist; create it or pick another path")
    train_paths, val_paths = expand_sources(sources), expand_sources(val) if val else []
    _check_distinct(train_paths, val_paths)
    jobs = jobs or os.cpu_count() or 1
    scans = scan_all([*train_paths, *val_paths], label, jobs=jobs, sha256=sha256, progress=progress)
    scans, skipped = _drop_unusable(scans, skip_damaged)
    classes = _classes(scans, label, classes_file)
    train = [s for s in scans if s.path in set(train_paths)]
    held = [s for s in scans if s.path in set(val_paths)]
    if not val_paths and val_frac > 0:
        train, held = _hold_out(train, val_frac, seed)
    splits = {"train": _split("train", train, label, classes, out.parent)}
    if held:
        splits["val"] = _split("val", held, label, classes, out.parent)
    if not train:
        raise PreflightError("no usable train shard is left to index")
    images = sorted({e for s in scans for e in s.members if e in IMAGE_EXTS})
    index = DataIndex(
        root=out.parent,
        classes=tuple(classes),
        splits=splits,
        image_format=images[0] if len(images) == 1 else "mixed",
        source={"kind": "index", "sources": list(sources), "val": list(val)},
        seed=seed,
        val_frac=val_frac,
        label=label,
        file=None if out.name == INDEX_NAME else out,
    )
    try:
        write_index(index, out)
    except OSError as e:
        raise PreflightError(
            f"cannot write the index {out} ({e.strerror or e}); pass --out a path you can write (the shards may "
            f"stay on a read-only mount: the index names them by path)"
        ) from None
    return IndexReport(index, out, skipped, _notes(scans, label))


def _drop_unusable(scans: list[ShardScan], skip_damaged: bool) -> tuple[list[ShardScan], list[str]]:
    bad = [s for s in scans if s.error is not None]
    if bad and not skip_damaged:
        listed = "\n  ".join(f"{s.path}: {s.error}" for s in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise PreflightError(
            f"{len(bad)} of {len(scans)} shards cannot be indexed:\n  {listed}{more}\nRepair or remove them, or pass "
            f"--skip-damaged to index the rest (they are then left out of the index and listed)"
        )
    empty = [s for s in scans if s.error is None and s.samples == 0]
    skipped = [f"{s.path}: {s.error}" for s in bad] + [f"{s.path}: holds no sample" for s in empty]
    return [s for s in scans if s.error is None and s.samples > 0], skipped


def _classes(scans: list[ShardScan], label: LabelSpec, classes_file: str | Path | None) -> list[str]:
    """Class names: from --classes FILE (one per line), the JSON's names (sorted), or numbered 0..max."""
    if label.kind == "none":
        if classes_file:
            raise PreflightError("--classes names the classes of labels; it does not go with --unlabeled")
        return []
    values: Counter = Counter()
    for s in scans:
        values.update(s.labels)
    names = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if isinstance(v, int)]
    if names and numbers:
        raise PreflightError(
            f"the {label.describe()} hold both class names (e.g. {names[0]!r}) and numbers (e.g. {numbers[0]}); "
            f"use a field that holds one kind"
        )
    if classes_file is not None:
        return _classes_from_file(Path(classes_file), names, numbers)
    if names:
        return sorted(names)
    if not numbers:
        raise PreflightError(
            f"no sample has a usable label ({label.describe()}); pick the label with --label cls | json:FIELD, or "
            f"pass --unlabeled for data without labels"
        )
    return [str(i) for i in range(max(numbers) + 1)]


def _classes_from_file(path: Path, names: list[str], numbers: list[int]) -> list[str]:
    try:
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise PreflightError(f"--classes {path}: cannot read it ({e.strerror or e})") from None
    if len(set(classes)) != len(classes) or not classes:
        raise PreflightError(f"--classes {path}: needs one distinct class name per line (line i names class i)")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise PreflightError(
            f"{len(unknown)} class names in the labels are not in --classes {path}, e.g. {unknown[:3]}; add them "
            f"to the file or drop --classes to take the names from the labels"
        )
    if numbers and max(numbers) >= len(classes):
        raise PreflightError(
            f"the labels go up to {max(numbers)} but --classes {path} names {len(classes)} classes (0.."
            f"{len(classes) - 1}); give the full class list"
        )
    return classes


def _hold_out(train: list[ShardScan], val_frac: float, seed: int) -> tuple[list[ShardScan], list[ShardScan]]:
    """A seeded choice of whole shards as val (a sample never straddles the two splits)."""
    n_val = max(1, round(len(train) * val_frac))
    if n_val >= len(train):
        raise PreflightError(
            f"--val-frac {val_frac} of {len(train)} shards leaves no train shard; index more shards, lower "
            f"--val-frac, or name a separate val set with --val SOURCE..."
        )
    chosen = set(np.random.default_rng([seed & (2**63 - 1), _TAG_HOLDOUT]).permutation(len(train))[:n_val].tolist())
    return [s for i, s in enumerate(train) if i not in chosen], [s for i, s in enumerate(train) if i in chosen]


def _split(name: str, scans: list[ShardScan], label: LabelSpec, classes: list[str], base: Path) -> SplitInfo:
    ids = {c: i for i, c in enumerate(classes)} if label.kind == "json" else {}
    counts = [0] * len(classes)
    unlabeled = 0
    keys = tuple(sorted({k for s in scans for k in s.members}))
    shards = []
    for s in scans:
        for value, n in s.labels.items():
            counts[ids[value] if isinstance(value, str) else value] += n
        unlabeled += s.unlabeled
        members = tuple(s.members.get(k, 0) for k in keys)
        shards.append(ShardInfo(_relative(s.path, base), s.samples, s.bytes, s.sha256, members))
    return SplitInfo(name, tuple(shards), tuple(counts), unlabeled, keys)


def _relative(path: str, base: Path) -> str:
    """Relative to the index's directory when the shard lies under it, else absolute."""
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def _notes(scans: list[ShardScan], label: LabelSpec) -> list[str]:
    notes = []
    no_label = sum(s.unlabeled for s in scans) if label.kind != "none" else 0
    no_image = sum(s.no_image for s in scans)
    examples = [e for s in scans for e in s.examples][:3]
    if no_label:
        notes.append(
            f"{no_label} samples have no usable label ({label.describe()}); the loader skips them as missing_cls "
            f"(counted against data.max_skip_frac)"
        )
    if no_image:
        notes.append(f"{no_image} samples have no image member; the loader skips them as corrupt_image")
    if examples:
        notes.append("e.g. " + "; ".join(examples))
    return notes
