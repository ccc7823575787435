"""The launcher's refusals about data.path and the classes, before anything is queued.

Each case runs the real `launch/submit.py` main and checks the message names the problem and the
fix, and that the run dir holds no job.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch import submit
from tests.fixtures.foreign_shards import _gnu_tar, encoded
from tests.launch.conftest import REPO, smoke_args

pytestmark = pytest.mark.timeout(120)


def _refused(capsys: pytest.CaptureFixture, run_dir: Path, *args: str, rc: int) -> str:
    assert submit.main(list(args)) == rc
    assert not (run_dir / "job.json").exists() and not (run_dir / "submitit").exists()
    return capsys.readouterr().err


def _index(out: Path, *args: str | Path) -> Path:
    cmd = [sys.executable, "-m", "pipeline.data", "index", *map(str, args), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("url", ["https://data.example.org/in1k/train-{000000..000146}.tar", "s3://bucket/in1k",
                                 "pipe:curl -s http://x/a.tar"])  # fmt: skip
def test_a_url_is_refused_with_the_posix_path_rule(url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _refused(capsys, tmp_path / "run", *smoke_args(url, tmp_path / "run", "--local"), rc=2)  # type: ignore[arg-type]
    scheme = url.split(":", 1)[0]
    assert f"data.path {url!r}: the {scheme}: scheme is not supported" in err
    assert "data.path must be a POSIX path on a file system every node mounts" in err
    assert "python -m pipeline.data index SHARDS... --out INDEX.json" in err
    assert "https:/data" not in err  # not mangled into a relative path


def test_a_brace_pattern_is_refused_with_index_it_first(
    gnu_tar_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pattern = f"{gnu_tar_shards}/train-{{0..7}}.tar"
    err = _refused(capsys, tmp_path / "run", *smoke_args(pattern, tmp_path / "run", "--local"), rc=2)  # type: ignore[arg-type]
    assert f"data.path {pattern!r} is a shard pattern, not a data set" in err
    assert f"`python -m pipeline.data index '{pattern}' --out INDEX.json`" in err


def test_shards_without_an_index_and_a_missing_path(
    gnu_tar_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _refused(capsys, tmp_path / "run", *smoke_args(gnu_tar_shards, tmp_path / "run", "--local"), rc=1)
    assert f"index them with `python -m pipeline.data index {gnu_tar_shards} --out" in err
    assert "nothing was submitted" in err
    missing = tmp_path / "datasets" / "imagenet-1k-wds"
    err = _refused(capsys, tmp_path / "run", *smoke_args(missing, tmp_path / "run", "--local"), rc=1)
    assert f"data.path {missing} does not exist" in err and "pipeline.data index SHARDS... --out INDEX.json" in err
    assert "--synthetic" not in err  # never suggests writing toy images into a real data set's path


def test_twelve_classes_for_a_ten_class_head_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, shards = tmp_path / "src", tmp_path / "shards"
    src.mkdir()
    shards.mkdir()
    for i in range(12 * 8):
        (src / f"k{i:04d}.jpg").write_bytes(encoded(i, "JPEG"))
        (src / f"k{i:04d}.cls").write_text(str(i % 12))
    _gnu_tar(src, shards / "train-0.tar", dot=False)
    data = _index(tmp_path / "twelve.json", shards, "--val-frac", "0")
    args = smoke_args(data, tmp_path / "run", "--local", "model.num_classes=10", "train.micro_batch_size=8")
    err = _refused(capsys, tmp_path / "run", *args, rc=1)
    assert f"{data} has 12 classes but model.num_classes=10: labels up to 11 do not fit the head" in err
    assert "set model.num_classes=12" in err and "nothing was submitted" in err


def test_dry_run_accepts_an_index_file(shardwriter_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _index(tmp_path / "wds.json", f"{shardwriter_shards}/train-*.tar", "--val", shardwriter_shards / "val-*")
    assert submit.main(smoke_args(data, tmp_path / "run", "--local", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert f"data: {data} split 'train': 360 samples in 8 shards feed 2 ranks x 1 workers" in out
    assert "classes: 4 classes in the data, a head of 4 (model.num_classes)" in out
