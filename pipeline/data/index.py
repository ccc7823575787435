"""The shard index (``_info.json``): which shards make up each split, their sizes and checksums.

Written last and atomically by the writer (a crashed write leaves no index, so nothing reads a
half-written data set). Layout of a data directory::

    DIR/train-000000.tar ...  DIR/val-000000.tar ...  DIR/_info.json

``_info.json`` (format 1)::

    {"format_version": 1, "source": {...}, "image_format": "jpg", "image_size": [32, 32] | null,
     "classes": ["disc-0", ...], "seed": 0, "val_frac": 0.1,
     "splits": {"train": {"samples": 450, "class_counts": [..],
                          "shards": [{"name": "train-000000.tar", "samples": 64,
                                      "bytes": 81920, "sha256": "..."}, ...]}, "val": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.errors import PreflightError

INDEX_NAME = "_info.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the data directory
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    name: str
    shards: tuple[ShardInfo, ...]
    class_counts: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class DataIndex:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    image_format: str = "jpg"
    image_size: tuple[int, int] | None = None  # None: images keep their own sizes
    source: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    val_frac: float = 0.0
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """The split ``name``; a clear error when the index has no such split or it is empty."""
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise PreflightError(
                f"{self.root / INDEX_NAME}: no split {name!r} (the index has: {have}); write the shards with "
                f"--val-frac > 0 for a val split, or set data.train_split/data.val_split to an existing split"
            )
        info = self.splits[name]
        if not info.shards or info.samples == 0:
            raise PreflightError(
                f"{self.root / INDEX_NAME}: split {name!r} is empty (0 samples in {len(info.shards)} shards); "
                f"re-write the data set with `python -m pipeline.data.shards write --out {self.root} ...`"
            )
        return info

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.name

    def fingerprint(self, split: str) -> str:
        """Identifies the sample layout of a split (names and counts): positions mean the same samples."""
        layout = [(s.name, s.samples) for s in self.splits[split].shards]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "source": self.source,
            "image_format": self.image_format,
            "image_size": list(self.image_size) if self.image_size else None,
            "classes": list(self.classes),
            "seed": self.seed,
            "val_frac": self.val_frac,
            "splits": {
                name: {
                    "samples": info.samples,
                    "class_counts": list(info.class_counts),
                    "shards": [vars(s) for s in info.shards],
                }
                for name, info in self.splits.items()
            },
        }


def write_index(index: DataIndex) -> Path:
    """Write ``_info.json`` atomically (temp file + fsync + rename): readers see all of it or none."""
    path = index.root / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(index.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_index(path: str | Path) -> DataIndex:
    """Read and validate ``DIR/_info.json``; every problem raises :class:`PreflightError` naming the fix."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise PreflightError(
            f"data directory {root} {what}; write shards there with "
            f"`python -m pipeline.data.shards write --out {root} --synthetic 1000 --classes 10 --size 32` "
            f"or point data.path at an existing shard directory"
        )
    file = root / INDEX_NAME
    if not file.is_file():
        tars = sorted(p.name for p in root.glob("*.tar"))[:3]
        hint = f" (it holds {', '.join(tars)}...: an interrupted write?)" if tars else ""
        raise PreflightError(
            f"{file} is missing{hint}; the shard writer writes it last, so re-run "
            f"`python -m pipeline.data.shards write --out {root} ... --overwrite`"
        )
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreflightError(f"{file} is not valid JSON ({e}); re-write the data set with --overwrite") from None
    return _parse_index(root, file, raw)


def _parse_index(root: Path, file: Path, raw: Any) -> DataIndex:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise PreflightError(f"{file}: {what}; re-write the data set with the shard writer (--overwrite)")

    need(isinstance(raw, dict), "the top level must be an object")
    version = raw.get("format_version")
    need(version == FORMAT_VERSION, f"format_version is {version!r}, this code reads {FORMAT_VERSION}")
    classes = raw.get("classes")
    need(
        isinstance(classes, list) and len(classes) > 0 and all(isinstance(c, str) for c in classes),
        f"'classes' must be a non-empty list of class names (strings), got {_short(classes)}",
    )
    splits_raw = raw.get("splits")
    need(isinstance(splits_raw, dict) and len(splits_raw) > 0, "'splits' is missing or empty (an empty index)")
    splits = {name: _parse_split(name, s, len(classes), need) for name, s in splits_raw.items()}
    size = raw.get("image_size")
    need(
        size is None or (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)),
        f"'image_size' must be [height, width] or null, got {size!r}",
    )
    return DataIndex(
        root=root,
        classes=tuple(classes),
        splits=splits,
        image_format=str(raw.get("image_format", "jpg")),
        image_size=tuple(size) if size else None,  # type: ignore[arg-type]
        source=dict(raw.get("source") or {}),
        seed=int(raw.get("seed", 0)),
        val_frac=float(raw.get("val_frac", 0.0)),
    )


def _parse_split(name: str, raw: Any, num_classes: int, need: Any) -> SplitInfo:
    need(isinstance(raw, dict), f"split {name!r} must be an object")
    counts = raw.get("class_counts")
    need(
        isinstance(counts, list)
        and len(counts) == num_classes
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts),
        f"split {name!r}: 'class_counts' must be {num_classes} non-negative integers (one per class), "
        f"got {_short(counts)} (wrong label type?)",
    )
    shards_raw = raw.get("shards")
    need(isinstance(shards_raw, list), f"split {name!r}: 'shards' must be a list")
    shards = []
    for i, s in enumerate(shards_raw):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and "/" not in s["name"]
            and all(
                isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0 for k in ("samples", "bytes")
            )
            and isinstance(s.get("sha256"), str)
        )
        need(ok, f"split {name!r}: shard #{i} must have name (a file name), samples, bytes and sha256, got {_short(s)}")
        shards.append(ShardInfo(s["name"], s["samples"], s["bytes"], s["sha256"]))
    info = SplitInfo(name, tuple(shards), tuple(counts))
    need(
        sum(counts) == info.samples,
        f"split {name!r}: class_counts sum to {sum(counts)} but the shards hold {info.samples} samples",
    )
    return info


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
