"""The shard index: which shards make up each split, their sizes, labels and (for our own shards) checksums.

Two producers write one: the shard writer (``DIR/_info.json``, written last and atomically, so a
crashed write leaves no index) and ``python -m pipeline.data index`` for shards written by
anyone else (webdataset's ``ShardWriter``, GNU tar, img2dataset), which may live on a read-only mount:
that index is a file anywhere (``--out /scratch/me/in1k.json``). ``data.path`` names either a
directory holding ``_info.json`` or such an index file. Shard names resolve against the directory
of the index file: a bare or relative name lives under it, an absolute one anywhere.

Format 2 (format 1, the writer's older files, is still read: same fields, no ``label``, bare names)::

    {"format_version": 2, "source": {...}, "image_format": "jpg", "image_size": [32, 32] | null,
     "classes": ["disc-0", ...], "label": {"kind": "cls"} | {"kind": "json", "field": "label"} | {"kind": "none"},
     "seed": 0, "val_frac": 0.1,
     "splits": {"train": {"samples": 450, "class_counts": [..], "unlabeled": 0,
                          "shards": [{"name": "train-000000.tar", "samples": 64, "bytes": 81920,
                                      "sha256": "..." | null, "members": {"jpg": 64, "cls": 64}}, ...]},
                "val": {...}}}

``class_counts`` plus ``unlabeled`` (samples with no usable label; skipped as ``missing_cls`` at run
time) add up to ``samples``. ``sha256`` is null for indexed shards: hashing them would read every
byte of a data set that ``index`` otherwise reads only the tar headers of (see the README).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pipeline.config.schema import data_path_problem
from pipeline.data.errors import PreflightError
from pipeline.durable import atomic_write

INDEX_NAME = "_info.json"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
LabelKind = Literal["cls", "json", "none"]
INDEX_HINT = "python -m pipeline.data index"


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's class comes from: its ``cls`` member, a field of its ``json`` member, or nowhere."""

    kind: LabelKind = "cls"
    field: str = ""  # json only: the (top-level) field holding the class index or name

    @property
    def member(self) -> str | None:
        return None if self.kind == "none" else self.kind

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "field": self.field} if self.kind == "json" else {"kind": self.kind}

    def describe(self) -> str:
        return {"cls": "cls members", "json": f"json field {self.field!r}", "none": "none (unlabeled)"}[self.kind]


CLS_LABELS = LabelSpec()  # the writer's layout, and the default


class ShardInfo(NamedTuple):
    """One shard. A named tuple: every rank builds one per shard (100,000 of them load in well under a second)."""

    name: str  # path relative to the index file's directory (a bare file name for our own shards), or absolute
    samples: int
    bytes: int
    sha256: str | None = None  # None: not recorded (indexed in place; see the module doc)
    members: tuple[int, ...] | None = None  # member counts, one per SplitInfo.member_keys (indexed shards)


@dataclass(frozen=True)
class SplitInfo:
    name: str
    shards: tuple[ShardInfo, ...]
    class_counts: tuple[int, ...]
    unlabeled: int = 0  # samples without a usable label
    member_keys: tuple[str, ...] = ()  # the member extensions seen, sorted (what ShardInfo.members counts)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def members(self) -> dict[str, int]:
        """Member extension -> count over the split's shards (empty when not recorded)."""
        totals = [sum(col) for col in zip(*(s.members for s in self.shards if s.members), strict=True)]
        return dict(zip(self.member_keys, totals, strict=True)) if totals else {}

    def shards_json(self) -> dict[str, Any]:
        """The shards as columns: a list per field parses ~3x faster than an object per shard."""
        shas = [s.sha256 for s in self.shards]
        members = [list(s.members) if s.members else [] for s in self.shards]
        return {
            "name": [s.name for s in self.shards],
            "samples": [s.samples for s in self.shards],
            "bytes": [s.bytes for s in self.shards],
            "sha256": shas if any(shas) else None,
            "members": members if self.member_keys else None,
        }


@dataclass(frozen=True)
class DataIndex:
    root: Path  # the directory shard names resolve against (the index file's directory)
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    image_format: str = "jpg"
    image_size: tuple[int, int] | None = None  # None: images keep their own sizes
    source: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    val_frac: float = 0.0
    format_version: int = FORMAT_VERSION
    label: LabelSpec = CLS_LABELS
    file: Path | None = None  # the index file; None: root / _info.json
    _fingerprints: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def path(self) -> Path:
        """The index file itself."""
        return self.file if self.file is not None else self.root / INDEX_NAME

    @property
    def location(self) -> Path:
        """What data.path names: the data directory, or the index file when it is not ``_info.json`` there."""
        return self.root if self.file is None else self.file

    def split(self, name: str) -> SplitInfo:
        """The split ``name``; a clear error when the index has no such split or it is empty."""
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise PreflightError(
                f"{self.path}: no split {name!r} (the index has: {have}); write the shards with --val-frac > 0 "
                f"(or index them with --val SOURCE... / --val-frac) for a val split, or set "
                f"data.train_split/data.val_split to an existing split"
            )
        info = self.splits[name]
        if not info.shards or info.samples == 0:
            raise PreflightError(
                f"{self.path}: split {name!r} is empty (0 samples in {len(info.shards)} shards); "
                f"re-write the data set with `python -m pipeline.data write --out {self.root} ...` "
                f"or re-index its shards with `{INDEX_HINT} SHARDS... --out {self.path}`"
            )
        return info

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.name  # an absolute name replaces the root

    def fingerprint(self, split: str) -> str:
        """Identifies the sample layout of a split (names and counts): positions mean the same samples."""
        if split not in self._fingerprints:  # computed once: it hashes every shard name
            layout = [(s.name, s.samples) for s in self.splits[split].shards]
            self._fingerprints[split] = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
        return self._fingerprints[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "image_format": self.image_format,
            "image_size": list(self.image_size) if self.image_size else None,
            "classes": list(self.classes),
            "label": self.label.to_json(),
            "seed": self.seed,
            "val_frac": self.val_frac,
            "splits": {
                name: {
                    "samples": info.samples,
                    "class_counts": list(info.class_counts),
                    "unlabeled": info.unlabeled,
                    "member_keys": list(info.member_keys),
                    "shards": info.shards_json(),
                }
                for name, info in self.splits.items()
            },
        }


def write_index(index: DataIndex, path: str | Path | None = None) -> Path:
    """Write the index atomically (``pipeline.durable``): readers see all of it or none.

    ``path`` defaults to ``index.path`` (``root/_info.json`` for the writer's data directories).
    """
    path = Path(path) if path is not None else index.path
    atomic_write(path, json.dumps(index.to_json(), indent=None if _many_shards(index) else 1))
    return path


def _many_shards(index: DataIndex) -> bool:
    return sum(len(s.shards) for s in index.splits.values()) > 10_000  # compact: a smaller file to read per rank


def read_index(path: str | Path) -> DataIndex:
    """Read and validate a data directory's ``_info.json`` or an index file; problems raise PreflightError."""
    problem = data_path_problem(str(path))
    if problem:
        raise PreflightError(problem)
    given = Path(path)
    if given.is_dir():
        file = given / INDEX_NAME
        if not file.is_file():
            raise PreflightError(_no_index_message(given))
    elif given.is_file():
        file = given
    else:
        raise PreflightError(_missing_message(given))
    st = file.stat()
    key = (str(file.absolute()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE.clear()  # one data set per process, and it is read several times (checks, train, val)
        _CACHE[key] = _load(file, given)
    return _CACHE[key]


_CACHE: dict[tuple[str, int, int, int], DataIndex] = {}


def _load(file: Path, given: Path) -> DataIndex:
    try:
        raw = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreflightError(
            f"{file} is not valid JSON ({e}); {'re-write' if file.name == INDEX_NAME else 're-index'} the data set"
            + ("" if given.is_dir() else f" (data.path must be a shard directory or an index file from `{INDEX_HINT}`)")
        ) from None
    return _parse_index(file.parent, file, raw)


def _missing_message(path: Path) -> str:
    return (
        f"data.path {path} does not exist; point it at a directory of shards that holds {INDEX_NAME} (written by "
        f"`python -m pipeline.data write --out DIR SOURCE`) or at an index file made for existing shards "
        f"(`{INDEX_HINT} SHARDS... --out INDEX.json`, then data.path=INDEX.json). It must be a POSIX path on a "
        f"file system every node mounts"
    )


def _no_index_message(root: Path) -> str:
    tars = sorted(p.name for p in root.glob("*.tar"))
    if not tars:
        return (
            f"{root} holds no {INDEX_NAME} and no .tar shards; point data.path at a shard directory or an index file "
            f"(`{INDEX_HINT} SHARDS... --out INDEX.json`)"
        )
    return (
        f"{root / INDEX_NAME} is missing ({root} holds {len(tars)} .tar files, e.g. {', '.join(tars[:3])}); index "
        f"them with `{INDEX_HINT} {root} --out {root / INDEX_NAME}` (or `--out /somewhere/writable/index.json` when "
        f"{root} is read-only, then set data.path to that file)"
    )


def _parse_index(root: Path, file: Path, raw: Any) -> DataIndex:
    def need(cond: bool, what: str) -> None:
        if not cond:
            fix = "re-index the shards" if file.name != INDEX_NAME or version == 2 else "re-write the data set"
            raise PreflightError(f"{file}: {what}; {fix} (`{INDEX_HINT}` or the shard writer with --overwrite)")

    version = raw.get("format_version") if isinstance(raw, dict) else None
    need(isinstance(raw, dict), "the top level must be an object")
    readable = ", ".join(map(str, READ_VERSIONS))
    need(version in READ_VERSIONS, f"format_version is {version!r}, this code reads {readable}")
    label = _parse_label(raw.get("label", {"kind": "cls"}), need)
    classes = raw.get("classes")
    need(
        isinstance(classes, list)
        and (len(classes) > 0 or label.kind == "none")
        and all(isinstance(c, str) for c in classes),
        f"'classes' must be a non-empty list of class names (strings), got {_short(classes)}",
    )
    splits_raw = raw.get("splits")
    need(isinstance(splits_raw, dict) and len(splits_raw) > 0, "'splits' is missing or empty (an empty index)")
    splits = {name: _parse_split(name, s, len(classes), version, need) for name, s in splits_raw.items()}
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
        format_version=version,
        label=label,
        file=None if file == root / INDEX_NAME else file,
    )


def _parse_label(raw: Any, need: Any) -> LabelSpec:
    ok = isinstance(raw, dict) and raw.get("kind") in ("cls", "json", "none")
    need(ok, f"'label' must be {{'kind': 'cls' | 'json' | 'none'}}, got {_short(raw)}")
    field_name = raw.get("field", "")
    need(raw["kind"] != "json" or (isinstance(field_name, str) and field_name), "a json label needs its 'field'")
    return LabelSpec(raw["kind"], field_name if raw["kind"] == "json" else "")


def _all_type(values: list, kind: type) -> bool:
    return set(map(type, values)) <= {kind}  # C loops: the columns of 100k shards check in milliseconds


def _counts(values: list) -> bool:
    """Non-negative integers (``bool`` is not one)."""
    return _all_type(values, int) and (not values or min(values) >= 0)


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0  # not bool


def _parse_split(name: str, raw: Any, num_classes: int, version: int, need: Any) -> SplitInfo:
    need(isinstance(raw, dict), f"split {name!r} must be an object")
    counts = raw.get("class_counts")
    need(
        isinstance(counts, list) and len(counts) == num_classes and all(map(_is_count, counts)),
        f"split {name!r}: 'class_counts' must be {num_classes} non-negative integers (one per class), "
        f"got {_short(counts)} (wrong label type?)",
    )
    unlabeled = raw.get("unlabeled", 0)
    need(_is_count(unlabeled), f"split {name!r}: 'unlabeled' must be a non-negative integer, got {unlabeled!r}")
    keys = raw.get("member_keys", [])
    need(isinstance(keys, list) and all(isinstance(k, str) for k in keys), f"split {name!r}: bad 'member_keys'")
    if version == 1 or isinstance(raw.get("shards"), list):
        shards = _parse_shard_rows(name, raw.get("shards"), version, need)
    else:
        shards = _parse_shard_columns(name, raw.get("shards"), len(keys), need)
    info = SplitInfo(name, shards, tuple(counts), unlabeled, tuple(keys))
    need(
        sum(counts) + unlabeled == info.samples,
        f"split {name!r}: class_counts sum to {sum(counts)} (+ {unlabeled} unlabeled) but the shards hold "
        f"{info.samples} samples",
    )
    return info


def _parse_shard_rows(name: str, raw: Any, version: int, need: Any) -> tuple[ShardInfo, ...]:
    """Format 1's list of shard objects; format 2 reads it too (a hand-written index), with paths and no sha256."""
    need(isinstance(raw, list), f"split {name!r}: 'shards' must be a list")
    shards = []
    for i, s in enumerate(raw):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s["name"] != ""
            and ("/" not in s["name"] or version > 1)
            and all(_is_count(s.get(k)) for k in ("samples", "bytes"))
            and (isinstance(s.get("sha256"), str) or (version > 1 and s.get("sha256") is None))
        )
        what = "name (a file name), samples, bytes and sha256" if version == 1 else "name, samples and bytes"
        need(ok, f"split {name!r}: shard #{i} must have {what}, got {_short(s)}")
        shards.append(ShardInfo(s["name"], s["samples"], s["bytes"], s.get("sha256")))
    return tuple(shards)


def _parse_shard_columns(name: str, raw: Any, n_keys: int, need: Any) -> tuple[ShardInfo, ...]:
    """Columns checked whole (C-speed ``all`` over each list), then zipped into ShardInfo tuples."""
    need(isinstance(raw, dict), f"split {name!r}: 'shards' must be an object of columns (name, samples, bytes, ...)")
    names, samples, sizes = raw.get("name"), raw.get("samples"), raw.get("bytes")
    need(isinstance(names, list), f"split {name!r}: 'shards.name' must be a list of paths")
    n = len(names)
    need(_all_type(names, str) and "" not in names, f"split {name!r}: every shard name must be a non-empty path")
    for field_name, column in (("samples", samples), ("bytes", sizes)):
        need(
            isinstance(column, list) and len(column) == n and _counts(column),
            f"split {name!r}: 'shards.{field_name}' must be {n} non-negative integers, got {_short(column)}",
        )
    shas, members = raw.get("sha256"), raw.get("members")
    need(
        shas is None or (isinstance(shas, list) and len(shas) == n and all(v is None or type(v) is str for v in shas)),
        f"split {name!r}: 'shards.sha256' must be null or {n} hex digests (or nulls)",
    )
    need(
        members is None
        or (
            isinstance(members, list)
            and len(members) == n
            and _all_type(members, list)
            and set(map(len, members)) <= {n_keys}
            and _counts(list(itertools.chain.from_iterable(members)))
        ),
        f"split {name!r}: 'shards.members' must be null or {n} lists of {n_keys} counts (one per member_keys)",
    )
    shas = shas if shas is not None else [None] * n
    counts = map(tuple, members) if members is not None else [None] * n
    return tuple(map(ShardInfo, names, samples, sizes, shas, counts))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
