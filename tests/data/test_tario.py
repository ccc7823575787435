"""Damaged shards: bad samples are skipped, counted by kind, replaced in the batch, and never hang a rank."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.data import DataError, build_loader, read_index
from pipeline.data.tario import ShardReader
from tests.data.conftest import SIZE, data_cfg, keys_of, run_ranks, split_keys, take

pytestmark = pytest.mark.timeout(60)


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def sample_member(path: Path, sample: int, ext: str) -> tarfile.TarInfo:
    return [m for m in members(path) if m.name.endswith("." + ext)][sample]


def rewrite(path: Path, change) -> None:
    """Re-create the tar with ``change(member, data) -> data | None`` (None drops the member)."""
    with tarfile.open(path) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in kept:
            if (data := change(m, data)) is not None:
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))


def damage(root: Path) -> dict[str, set[str]]:
    """Damage five of the eight train shards (50 samples each); return the keys that became unusable."""
    shard = [root / f"train-{i:06d}.tar" for i in range(8)]
    lost = {}
    jpg = sample_member(shard[0], 3, "jpg")  # 1 corrupt image: its JPEG header overwritten
    with open(shard[0], "r+b") as f:
        f.seek(jpg.offset_data)
        f.write(b"\0" * 16)
    lost["corrupt_image"] = {jpg.name.split(".")[0]}
    cut = sample_member(shard[1], 20, "jpg")  # truncated inside sample 20: 30 samples lost
    lost["truncated_tar"] = set(split_keys_of(shard[1])[20:])
    with open(shard[1], "r+b") as f:
        f.truncate(cut.offset_data + 10)
    lost["empty_shard"] = set(split_keys_of(shard[2]))  # 50 samples lost
    shard[2].write_bytes(b"")
    no_cls, cat = split_keys_of(shard[3])[5:7]  # 2 missing_cls: one cls gone, one not an integer
    rewrite(shard[3], lambda m, d: None if m.name == f"{no_cls}.cls" else (b"cat" if m.name == f"{cat}.cls" else d))
    lost["missing_cls"] = {no_cls, cat}
    lost["unreadable_shard"] = set(split_keys_of(shard[4]))  # not a tar: 50 samples lost
    shard[4].write_bytes(b"this is not a tar archive " * 100)
    return lost


def split_keys_of(path: Path) -> list[str]:
    return [m.name.split(".")[0] for m in members(path) if m.name.endswith(".cls")]


@pytest.fixture
def damaged(tmp_path, synthetic_shards):
    root = Path(shutil.copytree(synthetic_shards, tmp_path / "damaged"))
    good = set(split_keys(root))
    lost = damage(root)
    return root, good, lost


@pytest.mark.parametrize("buffer", [32, 5])  # 5: whole blocks unreadable, batches borrow from later blocks
def test_damaged_shards_are_skipped_and_counted_by_kind(damaged, buffer):
    root, good, lost = damaged
    cfg = data_cfg(root, shuffle_buffer=buffer, max_skip_frac=1.0)
    start = time.monotonic()
    ranks = run_ranks(cfg, world=2, batch=9)  # 4 slots x 90: every position is read once
    elapsed = time.monotonic() - start
    totals = {k: sum(c[k] for _, _, c, _ in ranks) for k in ranks[0][2]}
    assert totals == {
        "data/skipped_corrupt_image": 1,
        "data/skipped_truncated_tar": 30,
        "data/skipped_empty_shard": 50,
        "data/skipped_missing_cls": 2,
        "data/skipped_unreadable_shard": 50,
        "data/samples_read": 360,
        "data/gpu_decode_fallbacks": 0,  # counted with data.decoder=nvjpeg only
    }
    bad = set().union(*lost.values())
    assert len(bad) == 133
    assert [len(batches) for batches, *_ in ranks] == [20, 20]  # the same as on clean data
    seen = [k for batches, *_ in ranks for k in keys_of(batches)]
    assert len(seen) == 360 and not set(seen) & bad and set(seen) <= good - bad
    assert all(int(labels.min()) >= 0 for batches, *_ in ranks for _, labels, _ in batches)
    assert elapsed < 30  # no per-error sleeps (133 errors x 0.5 s would be 66 s)


def test_resume_is_exact_on_damaged_data(damaged):
    root, *_ = damaged
    cfg = data_cfg(root, shuffle_buffer=8, max_skip_frac=1.0)
    kw = dict(rank=0, world_size=2, batch_size=9, image_size=SIZE, seed=0, with_keys=True)
    with build_loader(cfg, **kw) as loader:
        straight = keys_of(take(loader, 16))
        straight_counts = loader.counters()
    with build_loader(cfg, **kw) as loader:
        take(loader, 5)
        state = loader.state_dict()
    with build_loader(cfg, **kw) as loader:
        loader.load_state_dict(state)
        assert keys_of(take(loader, 11)) == straight[5 * 9 :]
        assert loader.counters() == straight_counts  # restored counts + the rest = an uninterrupted run
        assert sum(v for k, v in straight_counts.items() if "skipped" in k) > 0


def test_skip_rate_over_the_threshold_aborts_with_the_reason(damaged):
    root, *_ = damaged
    cfg = data_cfg(root, num_workers=0, max_skip_frac=0.05, skip_check_after=40)
    with build_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=0) as loader:
        with pytest.raises(DataError, match=r"were skipped \(.*%\), above data.max_skip_frac=0.05") as err:
            take(loader, 45)
    assert "skip_check_after=40" in str(err.value) and "train-0000" in str(err.value)


def test_reader_flags_each_kind_and_skips_ahead_by_headers(damaged):
    root, *_ = damaged
    classes = read_index(root).num_classes

    def kinds(name: str, ordinals: list[int]) -> list[str | None]:
        reader = ShardReader(root / name, expected=50, num_classes=classes)
        return [s.bad for s in reader.read(ordinals)]

    assert kinds("train-000000.tar", [2, 3, 4]) == [None, None, None]  # a JPEG flip is found at decode time
    assert kinds("train-000001.tar", [0, 19, 20, 49]) == [None, None, "truncated_tar", "truncated_tar"]
    assert kinds("train-000002.tar", [0]) == ["empty_shard"]
    assert kinds("train-000003.tar", [4, 5, 6, 7]) == [None, "missing_cls", "missing_cls", None]
    assert kinds("train-000004.tar", [10]) == ["unreadable_shard"]
    reader = ShardReader(root / "train-000005.tar", expected=50, num_classes=classes)
    late, early = reader.read([40])[0], reader.read([1])[0]  # going back re-opens the file
    assert late.key == split_keys_of(root / "train-000005.tar")[40] and early.bad is None and late.label >= 0
    header = sample_member(root / "train-000005.tar", 30, "cls").offset  # a flipped byte in a tar header
    with open(root / "train-000005.tar", "r+b") as f:
        f.seek(header + 10)
        f.write(b"?")
    assert kinds("train-000005.tar", [29, 30, 49]) == [None, "truncated_tar", "truncated_tar"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_understands_pax_and_gnu_long_names(tmp_path, fmt):
    long_key = "dir/" + "k" * 120 + "é"  # over ustar's 100-byte name field, and not ASCII
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, label in ((long_key, 2), ("short", 1)):
            for ext, data in (("cls", str(label).encode()), ("jpg", b"jpeg bytes")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1.5  # a float mtime makes pax write a header per member
                tf.addfile(info, io.BytesIO(data))
    got = ShardReader(path, expected=2, num_classes=3).read([0, 1])
    assert [(s.key, s.label, s.image, s.bad) for s in got] == [
        (long_key, 2, b"jpeg bytes", None),
        ("short", 1, b"jpeg bytes", None),
    ]


def _walked(path: Path) -> list[tuple[str, int, int]] | str:
    """Every member by the header-by-header walk, or the error it stops with."""
    from pipeline.data.tario import TarBroken, TarHeaders

    out, headers = [], None
    with open(path, "rb") as f:
        headers = TarHeaders(f)
        try:
            while (m := headers.next()) is not None:
                out.append(tuple(m))
        except TarBroken as e:
            return str(e)
    return out


def _plain(path: Path) -> list[tuple[str, int, int]] | None:
    import mmap

    from pipeline.data.tario import plain_members

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        found = plain_members(view)
    return None if found is None else list(zip(*found, strict=True))


def _archive(path: Path, fmt: int, names: list[str], mtime: float = 7.0) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, name in enumerate(names):
            data = f"{i}".encode() * (i * 37 % 900)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tf.addfile(directory)
    return path


def test_the_indexers_fast_path_finds_what_the_header_walk_finds_or_steps_aside(tmp_path: Path) -> None:
    import subprocess

    names = [f"s{i:04d}.{ext}" for i in range(40) for ext in ("cls", "jpg", "json")]
    covered = {  # what ShardWriter (pax, float mtime), Python's ustar/GNU and GNU tar itself write
        "shardwriter": _archive(tmp_path / "sw.tar", tarfile.PAX_FORMAT, names, mtime=1.25),
        "ustar": _archive(tmp_path / "ustar.tar", tarfile.USTAR_FORMAT, names),
        "gnu": _archive(tmp_path / "gnu.tar", tarfile.GNU_FORMAT, names),
    }
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(names[:30]):
        (src / name).write_bytes(b"x" * (i * 101))
    for fmt in ("gnu", "posix", "ustar"):
        out = covered[f"gnu tar --format={fmt}"] = tmp_path / f"tar-{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-C", str(src), "-cf", str(out), "."], check=True)
    for what, path in covered.items():
        walked = _walked(path)
        assert isinstance(walked, list) and len(walked) >= 30, what
        assert _plain(path) == walked, what

    long = [f"{'d' * 90}/{'k' * 30}.{ext}" for ext in ("cls", "jpg")]  # a ustar prefix / a long name
    aside = {
        "pax path": _archive(tmp_path / "pax-long.tar", tarfile.PAX_FORMAT, [*names[:3], "é" * 120 + ".jpg"]),
        "gnu long name": _archive(tmp_path / "gnu-long.tar", tarfile.GNU_FORMAT, [*names[:3], "x" * 120 + ".jpg"]),
        "ustar prefix": _archive(tmp_path / "prefix.tar", tarfile.USTAR_FORMAT, long),
    }
    for what, path in aside.items():
        assert _plain(path) is None, what
        assert isinstance(_walked(path), list), what

    flipped = tmp_path / "flipped.tar"  # one byte of the 10th header's name: its checksum fails
    flipped.write_bytes(covered["ustar"].read_bytes())
    with open(flipped, "r+b") as f:
        f.seek(sample_member(flipped, 3, "cls").offset + 5)
        f.write(b"?")
    cut = tmp_path / "cut.tar"  # no end-of-archive marker
    cut.write_bytes(covered["ustar"].read_bytes()[: sample_member(covered["ustar"], 30, "jpg").offset_data + 512])
    for path in (flipped, cut):
        assert _plain(path) is None
        assert isinstance(_walked(path), str)
