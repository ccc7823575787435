"""Preflight and its CLI: every bad input gets a clear error before anything is queued."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import PreflightError, preflight
from pipeline.data.index import INDEX_NAME

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def copy(tmp_path, synthetic_shards) -> Path:
    return Path(shutil.copytree(synthetic_shards, tmp_path / "copy"))


def test_report_counts_classes_and_slots(synthetic_shards):
    report = preflight(synthetic_shards, ranks=2, workers=2, batch_size=8, decode=True, checksum=True)
    assert report.samples == 360 and report.shards == 8
    assert sum(report.class_counts.values()) == 360 and len(report.class_counts) == 4
    assert (report.slots, report.samples_per_slot, report.batches_per_slot, report.batches_per_rank) == (4, 90, 11, 22)
    assert report.dropped_per_epoch == 360 - 4 * 88
    assert report.checked == ["files", "sha256", "decode"] and report.bad_samples == {}
    assert "OK: every rank and worker gets data" in report.summary()
    few = preflight(synthetic_shards, ranks=4, workers=4, batch_size=2)
    assert any("8 shards for 16 slots" in note for note in few.notes)  # allowed: slots split shards


def test_geometry_that_starves_a_rank_is_refused(synthetic_shards):
    with pytest.raises(PreflightError, match=r"16 ranks x 4 workers = 64 slots get 5 each, less than one batch of 8"):
        preflight(synthetic_shards, ranks=16, workers=4, batch_size=8)


def test_missing_directory_and_index(tmp_path, copy):
    with pytest.raises(PreflightError) as err:
        preflight(tmp_path / "nope")
    text = str(err.value)
    assert f"data.path {tmp_path / 'nope'} does not exist" in text
    assert "pipeline.data write --out DIR SOURCE" in text and "pipeline.data index SHARDS... --out INDEX.json" in text
    assert "--synthetic" not in text  # never suggests writing toy images into a real data set's path
    (copy / INDEX_NAME).unlink()
    with pytest.raises(PreflightError) as err:
        preflight(copy)
    assert str(err.value) == (
        f"{copy / INDEX_NAME} is missing ({copy} holds 9 .tar files, e.g. train-000000.tar, train-000001.tar, "
        f"train-000002.tar); index them with `python -m pipeline.data index {copy} --out {copy / INDEX_NAME}` "
        f"(or `--out /somewhere/writable/index.json` when {copy} is read-only, then set data.path to that file)"
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(splits={}), "'splits' is missing or empty"),
        (lambda d: d["splits"]["train"].update(shards=[], class_counts=[0, 0, 0, 0]), "split 'train' is empty"),
        (lambda d: d["splits"]["train"].update(class_counts=["a", 1, 2, 3]), "wrong label type"),
        (lambda d: d.update(classes=[0, 1, 2, 3]), "'classes' must be a non-empty list of class names"),
        (lambda d: d.update(format_version=7), "format_version is 7"),
    ],
)
def test_bad_index_is_named(copy, edit, message):
    raw = json.loads((copy / INDEX_NAME).read_text())
    edit(raw)
    (copy / INDEX_NAME).write_text(json.dumps(raw))
    with pytest.raises(PreflightError, match=message):
        preflight(copy)


def test_bad_shard_files_are_listed(copy):
    size = (copy / "train-000001.tar").stat().st_size
    (copy / "train-000001.tar").write_bytes(b"x" * size)  # same size, not a tar
    (copy / "train-000002.tar").unlink()
    (copy / "train-000003.tar").write_bytes(b"")
    with open(copy / "train-000004.tar", "r+b") as f:
        f.seek(3000)
        f.write(b"flip")
    with pytest.raises(PreflightError) as err:
        preflight(copy, checksum=True)
    text = str(err.value)
    assert "4 of 8 shards of split 'train' are unusable" in text
    assert "train-000001.tar: not a tar archive" in text and "train-000002.tar: missing" in text
    assert "train-000003.tar: empty (0 bytes), the index says" in text and "train-000004.tar: sha256" in text
    assert "Restore these files or re-write the data set" in text


def test_decode_finds_bad_samples_and_wrong_label_types(copy):
    import tarfile

    with tarfile.open(copy / "train-000000.tar") as tf:
        cls, jpg = tf.getmembers()[0], tf.getmembers()[3]  # sample 0's label, sample 1's image
    with open(copy / "train-000000.tar", "r+b") as f:
        f.seek(cls.offset_data)
        f.write(b"x")  # the label "x": not an integer
        f.seek(jpg.offset_data)
        f.write(b"\0" * 16)  # no JPEG header any more
    preflight(copy)  # the files themselves look fine
    with pytest.raises(
        PreflightError, match=r"2 of 360 samples .*\(missing_cls=1, corrupt_image=1\).*A cls must be an int"
    ):
        preflight(copy, decode=True)
    assert preflight(copy, decode=True, max_skip_frac=0.01).bad_samples == {"missing_cls": 1, "corrupt_image": 1}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.data", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_cli_write_then_check(tmp_path):
    out = tmp_path / "cli"
    done = _cli("write", "--out", str(out), "--synthetic", "48", "--classes", "3", "--size", "16",
                "--shard-max-count", "10", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "train 43 samples in 5 shards, 3 classes" in done.stdout
    ok = _cli("check", str(out), "--ranks", "2", "--workers", "2", "--batch-size", "4", "--decode", "--no-progress")
    assert ok.returncode == 0 and "OK: every rank and worker gets data" in ok.stdout
    bad = _cli("check", str(out), "--ranks", "4", "--workers", "2", "--batch-size", "8", "--no-progress")
    assert bad.returncode == 1 and "error: " in bad.stderr and "less than one batch of 8" in bad.stderr
    none = _cli("write", "--out", str(out))
    assert none.returncode == 1 and "give exactly one source" in none.stderr
