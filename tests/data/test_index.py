"""`pipeline.data index` on shards our writer did not write, then `check --decode`, the loader, and the refusals.

The producers are webdataset's ShardWriter and GNU tar (tests/fixtures/foreign_shards.py). Counts
are checked against the stdlib's own tar reader, so the index and the loader cannot agree on a
wrong number between themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.data import NO_LABEL, PreflightError, build_loader, check_classes, preflight, read_index
from pipeline.data.index import INDEX_NAME
from pipeline.data.tario import ShardReader
from tests.data.conftest import SIZE, data_cfg, keys_of, take
from tests.fixtures.foreign_shards import CLASSES, PER_SHARD, _gnu_tar, _key, class_name, encoded

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def shards(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m pipeline.data ARGS`, as a user runs it."""
    cmd = [sys.executable, "-m", "pipeline.data", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def tar_keys(path: Path) -> list[str]:
    """Sample keys in file order by the stdlib's tarfile (an independent parser), prefix and long names kept."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                head, _, base = m.name.rpartition("/")
                key = (head + "/" if head else "") + base.split(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def assert_counts_match_tar(index_path: Path) -> None:
    index = read_index(index_path)
    for info in index.splits.values():
        for shard in info.shards:
            path = index.shard_path(shard)
            keys = tar_keys(path)
            assert shard.samples == len(keys) and shard.bytes == path.stat().st_size
            reader = ShardReader(path, expected=shard.samples, num_classes=max(index.num_classes, 1))
            got = reader.read(list(range(shard.samples)))
            reader.close()
            assert [s.key for s in got] == keys  # the reader walks the same samples, names included
            assert not any(s.bad in ("truncated_tar", "empty_shard", "unreadable_shard") for s in got)


def test_shardwriter_shards_index_check_and_load(shardwriter_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "in1k-like.json"
    text = ok(shards("index", f"{shardwriter_shards}/train-*.tar", "--val", shardwriter_shards / "val-000000.tar",
                     "--out", out, "--no-progress"))  # fmt: skip
    assert f"{out}: 4 classes, labels from cls members" in text
    assert "train: 360 samples in 8 shards (members: cls=360, jpg=360, json=360)" in text
    assert "val: 40 samples in 1 shards (members: cls=40, jpg=40, json=40)" in text
    assert "1 samples have no usable label (cls members); the loader skips them as missing_cls" in text
    assert "e.g. train-000004.tar: n00000200 (no usable cls members)" in text
    raw = json.loads(out.read_text())
    assert raw["format_version"] == 2 and raw["classes"] == ["0", "1", "2", "3"]
    train = raw["splits"]["train"]
    assert train["class_counts"] == [89, 90, 90, 90] and train["unlabeled"] == 1  # n00000200 is class 0
    columns = train["shards"]  # one list per field: fast to load with 100,000 shards
    assert columns["name"] == [str(shardwriter_shards / f"train-{i:06d}.tar") for i in range(8)]
    assert columns["samples"] == [45] * 8 and columns["sha256"] is None
    assert train["member_keys"] == ["cls", "jpg", "json"] and columns["members"] == [[45, 45, 45]] * 8
    assert_counts_match_tar(out)

    strict = shards("check", out, "--decode", "--no-progress")
    assert strict.returncode == 1
    assert "2 of 360 samples of split 'train' are unreadable (corrupt_image=1, missing_cls=1)" in strict.stderr
    report = ok(shards("check", out, "--decode", "--max-skip-frac", "0.01", "--checksum", "--no-progress"))
    assert "360 samples in 8 shards, 4 classes (checked: files, decode)" in report
    assert "unreadable samples: corrupt_image=1, missing_cls=1" in report
    assert "8 of 8 shards have no sha256 in the index (indexed in place" in report

    # The loader yields every readable sample of an epoch once; the two bad ones are counted, not fed.
    cfg = data_cfg(out, num_workers=0, shuffle_buffer=45)
    with build_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=0, with_keys=True) as loader:
        keys = keys_of(take(loader, loader.batches_per_epoch))
        counters = loader.counters()
    assert counters["data/skipped_corrupt_image"] + counters["data/skipped_missing_cls"] == 2
    assert len(keys) == 360 and "n00000100" not in keys and "n00000200" not in keys
    assert len(set(keys)) == 358  # the two places of the bad samples hold stand-ins from their batches


def test_gnu_tar_long_names_pax_and_extra_members(gnu_tar_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "gnu.json"
    text = ok(shards("index", f"{gnu_tar_shards}/train-{{0..7}}.tar", "--val", f"{gnu_tar_shards}/val-*.tar",
                     "--out", out, "--jobs", "2", "--no-progress"))  # fmt: skip
    assert "train: 360 samples in 8 shards (members: cls=360, jpg=360, txt=72)" in text
    assert "val: 40 samples in 1 shards (members: cls=40, jpg=40, txt=8)" in text
    assert "note:" not in text  # nothing to skip
    assert_counts_match_tar(out)
    index = read_index(out)
    assert index.splits["train"].class_counts == (90, 90, 90, 90)
    # ./ prefixes (shard 0), GNU long names and pax paths (shard 7) come out whole
    first = ShardReader(index.shard_path(index.splits["train"].shards[0]), expected=PER_SHARD, num_classes=4)
    assert first.read([0])[0].key == f"./{_key(0)}" and len(_key(0)) > 100
    pax = ShardReader(index.shard_path(index.splits["train"].shards[7]), expected=PER_SHARD, num_classes=4)
    sample = pax.read([0])[0]  # sample 315: 315 % 9 == 0, a long name
    assert sample.key == _key(315) and sample.label == 315 % CLASSES and sample.bad is None
    report = ok(shards("check", out, "--decode", "--ranks", "2", "--workers", "2", "--batch-size", "16",
                       "--no-progress"))  # fmt: skip
    assert "360 samples in 8 shards, 4 classes (checked: files, decode)" in report
    assert "OK: every rank and worker gets data" in report


def test_json_labels_png_webp_and_class_file(json_label_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "json.json"
    text = ok(shards("index", f"{json_label_shards}/train-*.tar", "--val", f"{json_label_shards}/val-0.tar",
                     "--label", "json:label", "--out", out, "--no-progress"))  # fmt: skip
    assert "4 classes, labels from json field 'label'" in text
    assert "train: 360 samples in 8 shards (members: json=360, png=180, webp=180)" in text
    index = read_index(out)
    assert index.classes == ("diamond-3", "disc-0", "square-1", "triangle-2")  # the names in the JSON, sorted
    assert index.image_format == "mixed" and index.splits["train"].class_counts == (90, 90, 90, 90)
    report = ok(shards("check", out, "--decode", "--no-progress"))
    assert "disc-0      90" in report and "(checked: files, decode)" in report

    names = tmp_path / "classes.txt"
    names.write_text("".join(f"{class_name(c)}\n" for c in range(CLASSES)))
    ok(shards("index", f"{json_label_shards}/train-*.tar", "--val", f"{json_label_shards}/val-0.tar",
              "--label", "json:label", "--classes", names, "--out", out, "--no-progress"))  # fmt: skip
    index = read_index(out)
    assert index.classes == ("disc-0", "square-1", "triangle-2", "diamond-3")  # the file's order
    reader = ShardReader(index.shard_path(index.splits["train"].shards[1]), expected=PER_SHARD, num_classes=4,
                         label=index.label, classes=index.classes)  # fmt: skip
    assert [s.label for s in reader.read([0, 1, 2])] == [45 % 4, 46 % 4, 47 % 4]
    short = tmp_path / "short.txt"
    short.write_text("disc-0\nsquare-1\n")
    bad = shards("index", f"{json_label_shards}/train-*.tar", "--label", "json:label", "--classes", short,
                 "--out", tmp_path / "x.json", "--no-progress")  # fmt: skip
    assert bad.returncode == 1
    assert f"2 class names in the labels are not in --classes {short}, e.g. ['diamond-3', 'triangle-2']" in bad.stderr


def test_unlabeled_shards_index_check_and_are_refused_for_classification(
    json_label_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "unlabeled.json"
    text = ok(shards("index", json_label_shards, "--unlabeled", "--val-frac", "0", "--out", out, "--no-progress"))
    assert "no classes, labels from none (unlabeled)" in text and "train: 400 samples in 9 shards" in text
    report = ok(shards("check", out, "--decode", "--no-progress"))
    assert "400 samples in 9 shards, no classes (unlabeled) (checked: files, decode)" in report
    index = read_index(out)
    assert index.classes == () and index.splits["train"].unlabeled == 400
    with pytest.raises(
        PreflightError, match=r"indexed without labels \(--unlabeled\), but classification training"
    ) as excinfo:
        check_classes(index, 10)
    assert "pretrain on it with train.objective=mae" in str(excinfo.value)
    assert check_classes(index, 10, labels_needed=False).startswith("no labels (indexed --unlabeled)")
    both = shards("index", json_label_shards, "--unlabeled", "--label", "json:label", "--out", out)
    assert both.returncode == 1 and "--unlabeled and --label json:label contradict each other" in both.stderr


def test_unlabeled_shards_load_and_only_unreadable_samples_are_skipped(
    shardwriter_shards: Path, tmp_path: Path
) -> None:
    """Indexed --unlabeled, the sample without a cls member is a good sample (no label is needed) and
    only the corrupt image is skipped and stood in for: "no label" and "no image" are told apart."""
    out = tmp_path / "unlabeled.json"
    ok(shards("index", f"{shardwriter_shards}/train-*.tar", "--unlabeled", "--val-frac", "0", "--out", out,
              "--no-progress"))  # fmt: skip
    cfg = data_cfg(out, num_workers=0, shuffle_buffer=45)
    with build_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=0, with_keys=True) as loader:
        batches = take(loader, loader.batches_per_epoch)
        counters = loader.counters()
    assert counters["data/skipped_corrupt_image"] == 1 and counters["data/skipped_missing_cls"] == 0
    assert {int(v) for _, labels, _ in batches for v in labels} == {NO_LABEL}
    keys = keys_of(batches)
    assert len(keys) == 360 and "n00000100" not in keys and "n00000200" in keys
    assert len(set(keys)) == 359  # one stand-in, for the corrupt image only
    assert all(float(images.float().std()) > 0 for images, _, _ in batches)  # real pixels, no zero padding


def test_seeded_hold_out_of_whole_shards(shardwriter_shards: Path, tmp_path: Path) -> None:
    def held(seed: int) -> list[str]:
        out = tmp_path / f"h{seed}.json"
        text = ok(shards("index", f"{shardwriter_shards}/train-*.tar", "--val-frac", "0.25", "--seed", seed,
                         "--out", out, "--no-progress"))  # fmt: skip
        assert "val: 2 whole shards held out of the train sources (seed" in text
        index = read_index(out)
        assert len(index.splits["train"].shards) == 6
        return [Path(s.name).name for s in index.splits["val"].shards]

    assert held(3) == held(3) and len(held(3)) == 2
    assert held(3) != held(4) or held(3) != held(5)
    both = shards("index", f"{shardwriter_shards}/train-*.tar", "--val", shardwriter_shards / "val-000000.tar",
                  "--val-frac", "0.1", "--out", tmp_path / "x.json")  # fmt: skip
    assert both.returncode == 1 and "give either --val SOURCE... (a separate val set) or --val-frac" in both.stderr
    overlap = shards("index", f"{shardwriter_shards}/*.tar", "--val", shardwriter_shards / "val-000000.tar",
                     "--out", tmp_path / "x.json")  # fmt: skip
    assert overlap.returncode == 1 and "1 shards are both train and val sources" in overlap.stderr


@pytest.fixture
def readonly(gnu_tar_shards: Path, tmp_path: Path):
    """The GNU tar shards behind a read-only bind mount (root only)."""
    if os.geteuid() != 0:
        print("skipping: a read-only bind mount needs root")
        pytest.skip("a read-only bind mount needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(gnu_tar_shards), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_index_outside_a_read_only_shard_directory(readonly: Path, tmp_path: Path) -> None:
    inside = shards("index", readonly, "--out", readonly / "idx.json", "--no-progress")
    assert inside.returncode == 1
    assert f"cannot write the index {readonly / 'idx.json'} (Read-only file system)" in inside.stderr
    refused = shards("check", readonly, "--no-progress")
    assert refused.returncode == 1
    assert f"index them with `python -m pipeline.data index {readonly} --out" in refused.stderr
    assert "when" in refused.stderr and "is read-only, then set data.path to that file" in refused.stderr

    (tmp_path / "scratch").mkdir()
    out = tmp_path / "scratch" / "gnu.json"
    ok(shards("index", f"{readonly}/train-*.tar", "--val", f"{readonly}/val-0.tar", "--out", out, "--no-progress"))
    names = [s.name for s in read_index(out).splits["train"].shards]
    assert names[0] == str(readonly / "train-0.tar")  # absolute: the shards are not under the index's directory
    report = ok(shards("check", out, "--decode", "--no-progress"))
    assert "360 samples in 8 shards, 4 classes" in report


def test_relative_names_when_the_index_sits_beside_the_shards(gnu_tar_shards: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(gnu_tar_shards, tmp_path / "data" / "shards"))
    ok(shards("index", copy, "--val-frac", "0", "--out", tmp_path / "data", "--no-progress"))
    raw = json.loads((tmp_path / "data" / INDEX_NAME).read_text())
    assert raw["splits"]["train"]["shards"]["name"][:2] == ["shards/train-0.tar", "shards/train-1.tar"]
    moved = Path(shutil.move(tmp_path / "data", tmp_path / "moved"))  # index and shards move together
    assert preflight(moved, batch_size=8).samples == 400


def test_damaged_and_unordered_shards_are_named(gnu_tar_shards: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(gnu_tar_shards, tmp_path / "d"))
    data = (src / "train-2.tar").read_bytes()
    (src / "train-2.tar").write_bytes(data[: len(data) // 2])  # an interrupted copy
    (src / "train-3.tar").write_bytes(b"<html>not found</html>")
    bad = shards("index", src, "--out", tmp_path / "x.json", "--no-progress")
    assert bad.returncode == 1
    assert "2 of 9 shards cannot be indexed" in bad.stderr
    assert f"{src / 'train-2.tar'}: damaged: " in bad.stderr
    assert f"{src / 'train-3.tar'}: not a tar archive" in bad.stderr
    assert "pass --skip-damaged to index the rest" in bad.stderr
    text = ok(shards("index", src, "--skip-damaged", "--val-frac", "0", "--out", tmp_path / "x.json", "--no-progress"))
    assert "train: 310 samples in 7 shards" in text and f"left out: {src / 'train-3.tar'}: not a tar archive" in text

    unordered = tmp_path / "u"
    unordered.mkdir()
    for i in range(3):
        (tmp_path / f"a{i}.jpg").write_bytes(encoded(i, "JPEG"))
        (tmp_path / f"a{i}.cls").write_text("0")
    # all images first, then all labels: the members of a sample are not consecutive
    files = [f"a{i}.jpg" for i in range(3)] + [f"a{i}.cls" for i in range(3)]
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(unordered / "u.tar"), *files], check=True)
    bad = shards("index", unordered, "--out", tmp_path / "u.json", "--no-progress")
    assert bad.returncode == 1
    assert "the members of sample 'a0' are not consecutive" in bad.stderr and "tar --sort=name" in bad.stderr


def test_missing_and_extra_members_are_counted_as_the_loader_skips_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        if i != 3:
            (src / f"k{i}.jpg").write_bytes(encoded(i, "JPEG"))  # k3: no image
        if i != 5:
            (src / f"k{i}.cls").write_text(str(i % 2))  # k5: no label
        (src / f"k{i}.npy").write_bytes(b"\x93NUMPY")  # an extra member everywhere
    (tmp_path / "d").mkdir()
    _gnu_tar(src, tmp_path / "d" / "m.tar", dot=True)
    out = tmp_path / "m.json"
    text = ok(shards("index", tmp_path / "d", "--val-frac", "0", "--out", out, "--no-progress"))
    assert "train: 8 samples in 1 shards (members: cls=7, jpg=7, npy=8)" in text
    assert "1 samples have no usable label" in text and "1 samples have no image member" in text
    report = ok(shards("check", out, "--decode", "--max-skip-frac", "0.5", "--no-progress"))
    assert "unreadable samples: corrupt_image=1, missing_cls=1" in report


def test_format_1_indexes_still_load(synthetic_shards: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(synthetic_shards, tmp_path / "v1"))
    raw = json.loads((copy / INDEX_NAME).read_text())
    raw["format_version"] = 1
    raw.pop("label")
    for split in raw["splits"].values():
        split.pop("unlabeled")
        split.pop("member_keys")
        cols = split["shards"]
        rows = zip(cols["name"], cols["samples"], cols["bytes"], cols["sha256"], strict=True)
        split["shards"] = [dict(zip(("name", "samples", "bytes", "sha256"), row, strict=True)) for row in rows]
    (copy / INDEX_NAME).write_text(json.dumps(raw))
    index = read_index(copy)
    assert index.format_version == 1 and index.label.kind == "cls" and index.splits["train"].samples == 360
    assert preflight(copy, decode=True, checksum=True).checked == ["files", "sha256", "decode"]


def test_head_smaller_than_the_classes_is_refused(json_label_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "j.json"
    ok(shards("index", json_label_shards, "--label", "json:label", "--out", out, "--no-progress"))
    index = read_index(out)
    assert check_classes(index, 4) == "4 classes in the data, a head of 4 (model.num_classes)"
    assert "(6 outputs never a target)" in check_classes(index, 10)
    with pytest.raises(PreflightError) as err:
        check_classes(index, 3, key="finetune.num_classes")
    assert f"{out} has 4 classes but finetune.num_classes=3: labels up to 3 do not fit the head; set " in str(err.value)
    assert "finetune.num_classes=4" in str(err.value)
