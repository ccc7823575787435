"""Preflight: is a shard directory usable by R ranks x W workers? Run before anything is queued.

``preflight()`` reads the index, checks every shard file (exists, size, a tar header; sha256 with
``checksum=True``), optionally reads and decodes every sample (``decode=True``), and checks that every
(rank, worker) slot gets at least one batch per epoch. Problems raise :class:`PreflightError`
naming the files and the fix. Fewer shards than slots is *not* an error here: a slot's range of
samples may start and end mid-shard (see :mod:`pipeline.data.plan`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.errors import PreflightError
from pipeline.data.index import DataIndex, SplitInfo, read_index, sha256_file
from pipeline.data.pixels import decode_or_skip, decode_rgb
from pipeline.data.tario import ShardReader, is_tar


def _fix(index: DataIndex) -> str:
    """How to rebuild the index's data set: re-write our own shards, re-index anybody else's."""
    if index.file is None and index.source.get("kind") != "index":
        return f"re-write the data set with `python -m pipeline.data write --out {index.root} ... --overwrite`"
    return f"fix or remove them and re-index with `python -m pipeline.data index SHARDS... --out {index.path}`"


@dataclass
class PreflightReport:
    path: str
    split: str
    shards: int
    samples: int
    class_counts: dict[str, int]  # from the index; from the data itself when decoded
    ranks: int
    workers: int  # DataLoader workers per rank (0: the rank's main process reads)
    batch_size: int
    slots: int  # ranks x max(workers, 1)
    samples_per_slot: int
    batches_per_slot: int  # per epoch
    batches_per_rank: int  # per epoch, the same on every rank
    dropped_per_epoch: int  # the tail that does not fill one batch per slot
    checked: list[str] = field(default_factory=list)  # "files", "sha256", "decode"
    bad_samples: dict[str, int] = field(default_factory=dict)  # by kind (decode only)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        width = max((len(c) for c in self.class_counts), default=0)
        lines = [
            f"{self.path} split {self.split!r}: {self.samples} samples in {self.shards} shards, "
            f"{len(self.class_counts) or 'no'} classes{'' if self.class_counts else ' (unlabeled)'} "
            f"(checked: {', '.join(self.checked)})",
            *(f"  {name:<{width}}  {n}" for name, n in self.class_counts.items()),
            f"{self.ranks} ranks x {max(self.workers, 1)} workers = {self.slots} slots: {self.samples_per_slot} "
            f"samples and {self.batches_per_slot} batches of {self.batch_size} per slot, {self.batches_per_rank} "
            f"batches per rank per epoch, {self.dropped_per_epoch} samples dropped per epoch",
        ]
        if self.bad_samples:
            lines.append("unreadable samples: " + ", ".join(f"{k}={v}" for k, v in self.bad_samples.items()))
        lines += [f"note: {n}" for n in self.notes]
        lines.append("OK: every rank and worker gets data")
        return "\n".join(lines)


def check_geometry(
    index: DataIndex, info: SplitInfo, *, ranks: int, workers: int, batch_size: int
) -> tuple[int, int, int]:
    """(slots, samples per slot, batches per slot); raises when a slot would get no whole batch."""
    if ranks < 1 or workers < 0 or batch_size < 1:
        raise PreflightError(
            f"ranks must be >= 1, workers >= 0 and batch size >= 1; got {ranks}, {workers}, {batch_size}"
        )
    slots = ranks * max(workers, 1)
    per_slot = info.samples // slots
    nb = per_slot // batch_size
    if nb == 0:
        raise PreflightError(
            f"{index.location}: split {info.name!r} has {info.samples} samples; {ranks} ranks x {max(workers, 1)} "
            f"workers = {slots} slots get {per_slot} each, less than one batch of {batch_size}, so some rank "
            f"would get no data. Use fewer data.num_workers or ranks, a smaller batch, or write more samples "
            f"(at least {slots * batch_size})"
        )
    return slots, per_slot, nb


def check_classes(
    index: DataIndex, num_classes: int, *, key: str = "model.num_classes", labels_needed: bool = True
) -> str:
    """The classifier head (``key`` = ``num_classes`` outputs) can take every label of the index.

    Called by the launcher's preflight and by every rank before its first step: a label past the
    head is an index error at step 1 on a CPU and a device-side assert on a GPU. An objective that
    reads no labels (``labels_needed=False``: MAE) trains on unlabeled data; labels it does get are
    still checked, as its k-NN monitor votes over ``num_classes`` classes.
    """
    if index.label.kind == "none":
        if not labels_needed:
            return "no labels (indexed --unlabeled): the objective reads none; label-based monitors are off"
        raise PreflightError(
            f"{index.location} is indexed without labels (--unlabeled), but classification training needs a label "
            f"per sample: re-index with `cls` members or `--label json:FIELD`, or pretrain on it with "
            f"train.objective=mae, which reads no labels"
        )
    have = index.num_classes
    if have > num_classes:
        raise PreflightError(
            f"{index.location} has {have} classes but {key}={num_classes}: labels up to {have - 1} do not fit the "
            f"head; set {key}={have} (or train on data with at most {num_classes} classes)"
        )
    unused = f" ({num_classes - have} outputs never a target)" if num_classes > have else ""
    return f"{have} classes in the data, a head of {num_classes} ({key}){unused}"


def preflight(
    path: str | Path,
    *,
    split: str = "train",
    ranks: int = 1,
    workers: int = 1,
    decode: bool = False,
    batch_size: int = 1,
    checksum: bool = False,
    max_skip_frac: float = 0.0,
    progress: bool = False,
) -> PreflightReport:
    """Check that ``path`` can feed ``ranks`` x ``workers`` slots with batches of ``batch_size``."""
    index = read_index(path)
    info = index.split(split)
    slots, per_slot, nb = check_geometry(index, info, ranks=ranks, workers=workers, batch_size=batch_size)
    hashed = _check_files(index, info, checksum=checksum, progress=progress)
    report = PreflightReport(
        path=str(index.location),
        split=split,
        shards=len(info.shards),
        samples=info.samples,
        class_counts=dict(zip(index.classes, info.class_counts, strict=True)),
        ranks=ranks,
        workers=workers,
        batch_size=batch_size,
        slots=slots,
        samples_per_slot=per_slot,
        batches_per_slot=nb,
        batches_per_rank=nb * max(workers, 1),
        dropped_per_epoch=info.samples - slots * nb * batch_size,
        checked=["files", "sha256"] if checksum and hashed else ["files"],
    )
    if checksum and hashed < len(info.shards):
        report.notes.append(
            f"{len(info.shards) - hashed} of {len(info.shards)} shards have no sha256 in the index (indexed in place, "
            f"where hashing would read every byte): checked by size and tar header only"
        )
    if len(info.shards) < slots:
        report.notes.append(
            f"{len(info.shards)} shards for {slots} slots: several slots read parts of the same shard "
            f"(supported; more shards spread the reads)"
        )
    if decode:
        _decode_all(index, info, report, max_skip_frac=max_skip_frac, progress=progress)
    return report


def _check_files(index: DataIndex, info: SplitInfo, *, checksum: bool, progress: bool) -> int:
    """Every shard exists, has the index's size and starts with a tar header; returns how many were hashed."""
    problems, hashed = [], 0
    for shard in tqdm(info.shards, desc="checking shards", unit="shard", disable=not progress):
        p = index.shard_path(shard)
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != shard.bytes:
            what = "empty (0 bytes)" if size == 0 else f"{size} bytes"
            problems.append(f"{p}: {what}, the index says {shard.bytes} bytes (truncated or replaced)")
        elif not is_tar(p):
            problems.append(f"{p}: not a tar archive (its first block is not a tar header)")
        elif checksum and shard.sha256 is not None:
            hashed += 1
            if (digest := sha256_file(p)) != shard.sha256:
                problems.append(
                    f"{p}: sha256 {digest[:12]}... differs from the index's {shard.sha256[:12]}... (corrupted)"
                )
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise PreflightError(
            f"{len(problems)} of {len(info.shards)} shards of split {info.name!r} are unusable:\n  "
            + "\n  ".join(problems[:10])
            + more
            + f"\nRestore these files or {_fix(index)}"
        )
    return hashed


def _decode_all(
    index: DataIndex, info: SplitInfo, report: PreflightReport, *, max_skip_frac: float, progress: bool
) -> None:
    """Read every sample, decode every image, recount the classes from the data."""
    bad: Counter[str] = Counter()
    examples: list[str] = []
    labels: Counter[int] = Counter()
    for shard in tqdm(info.shards, desc="decoding", unit="shard", disable=not progress):
        reader = ShardReader(
            index.shard_path(shard),
            expected=shard.samples,
            num_classes=index.num_classes,
            label=index.label,
            classes=index.classes,
        )
        for i, sample in enumerate(reader.read(list(range(shard.samples)))):
            _, kind = decode_or_skip(sample, decode_rgb)  # the loaders' rule: what they would skip
            if kind is None:
                labels[sample.label] += 1  # -1: an unlabeled data set
                continue
            bad[kind] += 1
            if len(examples) < 5:
                examples.append(f"{shard.name} sample #{i} {sample.key or '?'}: {kind}")
        reader.close()
    report.checked.append("decode")
    report.bad_samples = dict(bad)
    n_bad = sum(bad.values())
    if n_bad > max_skip_frac * info.samples:
        raise PreflightError(
            f"{index.location}: {n_bad} of {info.samples} samples of split {info.name!r} are unreadable "
            f"({', '.join(f'{k}={v}' for k, v in bad.items())}), more than max_skip_frac={max_skip_frac}; e.g. "
            + "; ".join(examples)
            + f". {_label_rule(index)}. Fix these shards or "
            + _fix(index)
        )
    data_counts = {name: labels[i] for i, name in enumerate(index.classes)}
    if n_bad == 0 and data_counts != report.class_counts:
        diff = [
            f"{k}: index {report.class_counts[k]}, data {v}"
            for k, v in data_counts.items()
            if v != report.class_counts[k]
        ]
        raise PreflightError(
            f"{index.location}: the labels in the shards disagree with the index ({'; '.join(diff[:5])}); "
            + _fix(index)
        )
    report.class_counts = data_counts


def _label_rule(index: DataIndex) -> str:
    if index.label.kind == "json":
        return (
            f"A json field {index.label.field!r} must hold an integer in [0, {index.num_classes}) or a class name "
            f"of the index"
        )
    return f"A cls must be an integer in [0, {index.num_classes})"
