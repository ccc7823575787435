"""Reading samples out of tar shards by position, tolerating damaged shards.

A sample is the run of consecutive tar members that share a key (webdataset's convention:
``<key>.jpg``, ``<key>.cls``, ``<key>.json``). :class:`ShardReader` hands out samples by their
ordinal inside the shard; ordinals it skips are passed over by reading tar headers only (a seek
per member, no image bytes). The header parser is a small one of our own (ustar, pax and GNU long
names): the stdlib's ``tarfile`` costs ~3x more per member and stops silently at a bad header.

Nothing here raises on bad data: a sample that cannot be used comes
back with ``bad`` set to one of :data:`SKIP_KINDS`, so the caller can count it and keep going.
The outcome for a given file is deterministic, which is what keeps resume exact on damaged data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import numpy as np

from pipeline.data.index import CLS_LABELS, LabelSpec

log = logging.getLogger(__name__)

SkipKind = Literal["corrupt_image", "truncated_tar", "empty_shard", "missing_cls", "unreadable_shard"]
# corrupt_image: the image bytes do not decode (or the sample has no image member)
# truncated_tar: the shard ends (or stops parsing) before the index's sample count
# empty_shard: the shard file is empty or holds no sample at all
# missing_cls: no label (cls member, or the index's json field), or one that is not a class of the index
# unreadable_shard: the file is missing, unreadable, or not a tar archive
SKIP_KINDS: tuple[SkipKind, ...] = ("corrupt_image", "truncated_tar", "empty_shard", "missing_cls", "unreadable_shard")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class RawSample(NamedTuple):
    key: str
    label: int  # -1 when bad, or when the data set is unlabeled
    image: bytes | None
    ext: str
    bad: SkipKind | None
    shard: str


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): the key ends at the first dot of the base name."""
    if "/" not in name:  # the usual case, ~2x cheaper
        stem, _, ext = name.partition(".")
        return stem, ext.lower()
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{head}/{stem}", ext.lower()


class TarBroken(Exception):
    """The archive cannot be parsed from here on; the message says where and why."""


class Member(NamedTuple):
    name: str
    offset: int  # of the data
    size: int


# name, size, checksum, type flag, magic: one C call instead of five slices per header
_HEADER = struct.Struct("100s24x12s12x8sc100x5s")
_ZERO_BLOCK = bytes(512)


def _number(field: bytes) -> int:
    try:
        return int(field.rstrip(b"\0 "), 8)  # the usual case: octal digits, then NUL or space
    except ValueError:
        return _number_slow(field)


def _number_slow(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class TarHeaders:
    """Walks a tar file's headers: ``next()`` gives the next regular file member, None at the end.

    ``f`` is an open file or, faster, an ``mmap`` of one (a header is then one slice, no system call).
    """

    def __init__(self, f: BinaryIO | mmap.mmap) -> None:
        self.f = f
        self.pos = 0  # of the next header
        self._mapped = isinstance(f, mmap.mmap)

    def _read(self, start: int, size: int) -> bytes:
        if self._mapped:
            return self.f[start : start + size]
        self.f.seek(start)
        return self.f.read(size)

    def next(self) -> Member | None:
        pax: dict[str, str] = {}
        long_name = ""
        while True:
            start = self.pos
            block = self._read(start, 512)
            if len(block) < 512:
                where = "inside a header" if block else "without an end-of-archive marker"
                raise TarBroken(f"the file ends at byte {start + len(block)}, {where}")
            name, size_field, stored_field, kind, magic = _HEADER.unpack_from(block)
            if name[0] == 0 and block == _ZERO_BLOCK:
                return None  # end-of-archive
            try:
                stored = _number(stored_field)
                size = _number(size_field)
            except ValueError:
                raise TarBroken(f"no tar header at byte {start}") from None
            if not _checksum_ok(memoryview(block), stored):
                raise TarBroken(f"bad header checksum at byte {start}")
            if pax:
                size = int(pax.get("size", size))
            self.pos = start + 512 + (size + 511) // 512 * 512
            if kind in b"xgL":
                data = self._read(start + 512, size)
                if kind == b"x" and (b" path=" in data or b" size=" in data):  # else only times etc.: not needed
                    pax.update(_pax_records(data))
                elif kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                continue
            if kind not in b"07\0":  # directories, links, devices: not sample members
                pax, long_name = {}, ""
                continue
            path = pax.get("path") or long_name
            if not path:
                path = name.split(b"\0", 1)[0].decode("utf-8", "replace")
                if magic == b"ustar" and block[345:346] != b"\0":
                    path = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + path
            return Member(path, start + 512, size)


def _checksum_ok(view: memoryview, stored: int) -> bool:
    """``stored == sum(block)`` with the checksum field counted as 8 spaces, without a Python loop per byte.

    ``sum(block)`` iterates 512 ints in Python, most of a header's parse cost. adler32's low half is
    1 + the byte sum mod 65521, and each of the three pieces around the checksum field (bytes 148-156)
    sums to less than 65,521: three C calls give the exact sum.
    """
    total = (
        (zlib.adler32(view[:148]) & 0xFFFF)
        + (zlib.adler32(view[156:400]) & 0xFFFF)
        + (zlib.adler32(view[400:]) & 0xFFFF)
    )
    return total - 3 + 8 * 32 == stored


# Type flags of plain ustar members, as lookup tables: regular files; links, devices and directories
# (passed over, as TarHeaders does); pax headers (only those carrying times etc.: see _plain_checks).
_REGULAR, _KNOWN = np.zeros(256, bool), np.zeros(256, bool)
_REGULAR[[0, ord("0"), ord("7")]] = True
_KNOWN[[0, *b"01234567x"]] = True
_PAX = ord("x")
_OCTAL_6 = 8 ** np.arange(5, -1, -1)
_USTAR = np.frombuffer(b"ustar", np.uint8)


class Members(NamedTuple):
    """An archive's regular-file members as columns: names, data offsets, sizes."""

    names: list[str]
    offsets: list[int]
    sizes: list[int]


def plain_members(view: mmap.mmap) -> Members | None:
    """The regular-file members of an archive of plain ustar headers, checked all at once; None otherwise.

    The fast path of indexing, several times cheaper per header than :class:`TarHeaders`: the walk
    from header to header reads only each size field, then numpy checks every header's magic, type
    flag and checksum together, reading no byte beyond the headers (and each pax header's record).
    Anything it does not cover returns None, and the caller walks with :class:`TarHeaders` (the same
    members, and the exact error for a damaged archive): GNU long names, a ustar name prefix, pax
    records that set a path or size, global pax headers, base-256 sizes, no end-of-archive marker.
    """
    starts, sizes, pos = [], [], 0
    start, sized = starts.append, sizes.append
    with contextlib.suppress(ValueError):  # the end-of-archive block (no digits), or something else: see below
        while True:
            size = int(view[pos + 124 : pos + 135], 8)  # 11 octal digits and a NUL
            start(pos)
            sized(size)
            pos += 512 + (size + 511) // 512 * 512
    if not starts or pos > len(view) - 512 or view[pos : pos + 512] != _ZERO_BLOCK:
        return None
    blocks = np.frombuffer(view, np.uint8, count=len(view) // 512 * 512).reshape(-1, 512)
    try:
        found = Members([], [], [])
        for chunk in range(0, len(starts), _CHUNK):
            part = _plain_chunk(view, blocks, starts[chunk : chunk + _CHUNK], sizes[chunk : chunk + _CHUNK])
            if part is None:
                return None
            for column, more in zip(found, part, strict=True):
                column.extend(more)
        return found
    finally:
        del blocks  # the map must not stay exported: the caller closes it


_CHUNK = 1 << 15  # headers checked together: 16 MiB of copies, whatever the shard's size


def _plain_chunk(view: mmap.mmap, blocks: np.ndarray, starts: list[int], sizes: list[int]) -> Members | None:
    at, size = np.asarray(starts) // 512, np.asarray(sizes)
    heads = blocks[at]  # a copy: only header blocks are read
    pax = heads[:, 156] == _PAX
    pax_data = b"".join([view[starts[i] + 512 : starts[i] + 512 + sizes[i]] for i in np.flatnonzero(pax).tolist()])
    regular = np.flatnonzero(_REGULAR[heads[:, 156]])
    if not _plain_checks(heads, pax_data, size[pax]) or heads[regular, 345].any():  # 345: a ustar prefix
        return None
    names = _names(heads[regular, :101])
    if names is None:
        return None
    return Members(names, (at[regular] * 512 + 512).tolist(), size[regular].tolist())


def _names(fields: np.ndarray) -> list[str] | None:
    """Decoded names from the 100-byte name fields (plus one byte); None if a name is empty or has
    bytes after its NUL (TarHeaders reads a name up to the NUL)."""
    fields[:, 100] = 0  # a separator after each name (the copy's first byte of the mode field)
    keep = fields != 0
    if not (keep[:, 0].all() and (keep[:, 1:100] <= keep[:, :99]).all()):
        return None
    keep[:, 100] = True
    return fields[keep].tobytes().decode("utf-8", "replace").split("\0")[:-1]


def _plain_checks(heads: np.ndarray, pax_data: bytes, pax_sizes: np.ndarray) -> bool:
    """Known type flags, ustar magic, field ends, checksums (6 octal digits, NUL or space), harmless pax."""
    if not _KNOWN[heads[:, 156]].all() or not (heads[:, 257:262] == _USTAR).all():
        return False
    ends = heads[:, [135, 154]]  # the walk read 11 size digits: the 12th byte must end the field
    digits = heads[:, 148:154].astype(np.int64) - ord("0")
    if ((ends != 0) & (ends != 32)).any() or ((digits < 0) | (digits > 7)).any():
        return False
    field_sum = heads[:, 148:156].sum(axis=1, dtype=np.int64)
    if not (heads.sum(axis=1, dtype=np.int64) - field_sum + 8 * 32 == digits @ _OCTAL_6).all():
        return False
    return bool((pax_sizes <= 512).all()) and b" path=" not in pax_data and b" size=" not in pax_data


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records of a pax extended header."""
    out, i = {}, 0
    while i < len(data) and data[i : i + 1] != b"\0":
        length = int(data[i : data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1 : i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


def is_tar(path: Path) -> bool:
    """Does the file start with a valid tar header (or an end-of-archive block)?"""
    try:
        with open(path, "rb") as f:
            TarHeaders(f).next()
    except (TarBroken, OSError, ValueError):
        return False
    return True


class ShardReader:
    """Forward reader of one shard; ``read(ordinals)`` with increasing ordinals reads the file once."""

    def __init__(
        self,
        path: Path,
        *,
        expected: int,
        num_classes: int,
        label: LabelSpec = CLS_LABELS,
        classes: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.name = path.name
        self.expected = expected  # the index's sample count: ordinals past the data are 'truncated'
        self.num_classes = num_classes
        self.label = label
        self._labels = Labels(label, num_classes, classes)
        self._f: BinaryIO | None = None
        self._headers: TarHeaders | None = None
        self._opened = False
        self._failed: SkipKind | None = None  # set once the rest of the file is unusable
        self._next = 0  # ordinal of the next sample to be grouped
        self._pending: Member | None = None  # first member of the next sample
        self._eof = False

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f, self._headers = None, None

    def read(self, ordinals: list[int]) -> list[RawSample]:
        """Samples at the given increasing ordinals (bad ones flagged, never raised)."""
        if ordinals and ordinals[0] < self._next:
            self._restart()
        out = []
        for o in ordinals:
            while self._next < o:
                self._group(load=False)
            out.append(self._group(load=True))
        return out

    def _restart(self) -> None:
        self.close()
        self._opened, self._failed, self._next, self._pending, self._eof = False, None, 0, None, False

    def _open(self) -> None:
        self._opened = True
        try:
            if os.path.getsize(self.path) == 0:
                self._fail("empty_shard", "the file is empty")
                return
            self._f = open(self.path, "rb")
            self._headers = TarHeaders(self._f)
        except OSError as e:
            self._fail("unreadable_shard", f"cannot open ({e.strerror or e})")

    def _fail(self, kind: SkipKind, why: str) -> None:
        if self._failed is None:
            log.warning("shard %s: %s; the samples it still owes are skipped as %s", self.path, why, kind)
        self._failed = kind
        self.close()

    def _next_member(self) -> Member | None:
        if self._pending is not None:
            member, self._pending = self._pending, None
            return member
        if self._eof or self._headers is None:
            return None
        try:
            member = self._headers.next()
        except (TarBroken, OSError, ValueError) as e:
            at_start = self._headers.pos == 0
            self._fail("unreadable_shard" if at_start else "truncated_tar", f"{'not a tar: ' if at_start else ''}{e}")
            return None
        if member is None:
            self._eof = True
        return member

    def _group(self, *, load: bool) -> RawSample:
        """Consume the next sample's members; return it (data only when ``load``)."""
        ordinal = self._next
        self._next += 1
        if not self._opened:
            self._open()
        if self._failed is not None:
            return RawSample("", -1, None, "", self._failed, self.name)
        first = self._next_member()
        if first is None:
            return self._missing(ordinal)
        key, _ = split_name(first.name)
        members: dict[str, bytes | None] = {}
        member: Member | None = first
        while member is not None:
            mkey, ext = split_name(member.name)
            if mkey != key:
                self._pending = member
                break
            wanted = load and (ext in IMAGE_EXTS or ext == self.label.member)
            members[ext] = self._data(member) if wanted else None
            if self._failed is not None:  # this sample's own bytes are cut short
                return RawSample(key, -1, None, "", self._failed, self.name)
            member = self._next_member()  # a failure here loses what follows, and this sample if incomplete
        if member is None and not self._complete(members) and (self._failed or self._next < self.expected):
            # the file ended or broke inside this sample: its members are not all there
            return RawSample(key, -1, None, "", self._failed or "truncated_tar", self.name)
        return self._check(key, members) if load else RawSample(key, -1, None, "", None, self.name)

    def _missing(self, ordinal: int) -> RawSample:
        if self._failed is None and ordinal < self.expected:
            if ordinal == 0:
                self._fail("empty_shard", "it holds no sample")
            else:
                self._fail("truncated_tar", f"it ends after {ordinal} of {self.expected} samples")
        return RawSample("", -1, None, "", self._failed or "truncated_tar", self.name)

    def _data(self, member: Member) -> bytes | None:
        assert self._f is not None
        self._f.seek(member.offset)
        data = self._f.read(member.size)
        if len(data) != member.size:
            self._fail("truncated_tar", f"member {member.name} is cut short ({len(data)} of {member.size} bytes)")
            return None
        return data

    def _complete(self, members: dict[str, bytes | None]) -> bool:
        has_label = self.label.member is None or self.label.member in members
        return has_label and any(e in members for e in IMAGE_EXTS)

    def _check(self, key: str, members: dict[str, bytes | None]) -> RawSample:
        ext = next((e for e in IMAGE_EXTS if e in members), "")
        image = members.get(ext) if ext else None
        if image is None:
            return RawSample(key, -1, None, "", "corrupt_image", self.name)
        if self.label.member is None:
            return RawSample(key, -1, image, ext, None, self.name)
        label = self._labels.parse(members.get(self.label.member))
        if label is None:
            return RawSample(key, -1, None, ext, "missing_cls", self.name)
        return RawSample(key, label, image, ext, None, self.name)


def cls_value(raw: bytes) -> int | None:
    """The integer a ``cls`` member holds as text (None when it is not one); the indexer counts the same way."""
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def parse_label(raw: bytes | None, num_classes: int) -> int | None:
    """The class index in a ``cls`` member, or None when it is absent, not an integer, or out of range."""
    label = cls_value(raw) if raw is not None else None
    return label if label is not None and 0 <= label < num_classes else None


def label_value(raw: bytes, field: str) -> object:
    """The value of ``field`` in a json member (None when absent or not JSON)."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj.get(field) if isinstance(obj, dict) else None


class Labels:
    """Turns a sample's label member into a class index of the index (None: no usable label).

    ``cls``: an integer as text. ``json``: the field holds an integer or a class name of the index.
    """

    def __init__(self, spec: LabelSpec, num_classes: int, classes: tuple[str, ...] = ()) -> None:
        self.spec, self.num_classes = spec, num_classes
        self.ids = {name: i for i, name in enumerate(classes)}

    def parse(self, raw: bytes | None) -> int | None:
        if raw is None or self.spec.kind == "none":
            return None
        if self.spec.kind == "cls":
            return parse_label(raw, self.num_classes)
        value = label_value(raw, self.spec.field)
        if isinstance(value, str):
            return self.ids.get(value)
        if type(value) is int and 0 <= value < self.num_classes:
            return value
        return None


class ReaderCache:
    """A few open :class:`ShardReader` s, newest kept; a slot reads 1-2 shards at a time."""

    def __init__(
        self,
        root: Path,
        counts: dict[str, int],
        num_classes: int,
        size: int = 4,
        *,
        label: LabelSpec = CLS_LABELS,
        classes: tuple[str, ...] = (),
    ) -> None:
        self.root, self.counts, self.num_classes, self.size = root, counts, num_classes, size
        self.label, self.classes = label, classes
        self._readers: dict[str, ShardReader] = {}

    def get(self, name: str) -> ShardReader:
        reader = self._readers.pop(name, None)
        if reader is None:
            reader = ShardReader(
                self.root / name,
                expected=self.counts[name],
                num_classes=self.num_classes,
                label=self.label,
                classes=self.classes,
            )
        self._readers[name] = reader  # most recent last
        while len(self._readers) > self.size:
            self._readers.pop(next(iter(self._readers))).close()
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
