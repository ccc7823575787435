"""2 real DeepSpeed ranks train on shards our writer did not write, indexed in place.

ShardWriter shards (jpg/cls/json, one corrupt image and one bad cls among them): the loss falls, and
a run resumed from an earlier checkpoint reproduces the uninterrupted run's losses, skip counters
and weights exactly. GNU tar shards named by a brace pattern and a glob, and png/webp shards with
JSON class names read through a read-only mount with the index elsewhere, learn too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import read_index
from tests.train.conftest import REPO, assert_ok, losses, metrics, train

STEPS = 20  # 360 train samples / 32 per step: the run crosses an epoch boundary at step 11
SKIPS = ("data/skipped_corrupt_image", "data/skipped_missing_cls")


def index(out: Path, *args: str | Path) -> Path:
    cmd = [sys.executable, "-m", "pipeline.data", "index", *map(str, args), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=5", "tracking.enabled=false", "optim.warmup_steps=3", "model.num_classes=4",
        "train.zero_stage=2", *extra,
    ]  # fmt: skip


def assert_learned(run_dir: Path) -> None:
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(16, 21)) / 5
    assert last < 0.7 * first, f"loss did not fall enough: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert metrics(run_dir)[STEPS]["eval/top1"] >= 0.8


@pytest.mark.timeout(900)
def test_shardwriter_shards_learn_and_resume_exactly(shardwriter_shards: Path, tmp_path: Path) -> None:
    data = index(tmp_path / "wds.json", f"{shardwriter_shards}/train-*.tar", "--val", shardwriter_shards / "val-*.tar")
    reference = tmp_path / "reference"
    assert_ok(train(2, overrides(data, reference), timeout=420))
    assert_learned(reference)
    end = metrics(reference)[STEPS]
    assert end[SKIPS[0]] >= 1 and end[SKIPS[1]] >= 1  # the bad samples were met, counted and stood in for

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for tag in ("step_00000020", "step_00000015"):
        shutil.rmtree(resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text("step_00000010")
    proc = train(2, overrides(data, resumed), timeout=420)
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "step_00000010" in proc.stdout
    ref, got = losses(reference), losses(resumed)
    assert [got[s] for s in range(11, 21)] == [ref[s] for s in range(11, 21)]  # exact equality
    assert [metrics(resumed)[STEPS][k] for k in SKIPS] == [end[k] for k in SKIPS]
    a = load_file(str(reference / "export" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert_timm_loads(reference / "export", list(read_index(data).classes))


def assert_timm_loads(export: Path, names: list[str]) -> None:
    """timm's own loader rebuilds the trained model from the export, with its preprocessing and class names."""
    import json

    import timm

    from pipeline.artifacts.exports import load_export
    from pipeline.model import ViT

    meta = json.loads((export / "model.json").read_text())
    cfg = {
        k: v
        for k, v in meta["model"].items()
        if k not in ("preset", "grad_checkpointing", "recompute", "recompute_every")
    }
    ours = ViT(**cfg).eval()
    ours.load_state_dict(load_export(export)[0], strict=True)
    theirs = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    img = torch.randn(8, cfg["channels"], *theirs.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        diff = (theirs(img) - ours(img)).abs().max().item()
    assert meta["timm"] == "written" and diff < 1e-5, diff
    assert len(names) == 4 and list(theirs.pretrained_cfg["label_names"]) == names


@pytest.mark.timeout(600)
def test_gnu_tar_shards_from_brace_pattern_and_glob_learn(gnu_tar_shards: Path, tmp_path: Path) -> None:
    data = index(tmp_path / "gnu.json", f"{gnu_tar_shards}/train-{{0..7}}.tar", "--val", f"{gnu_tar_shards}/val-*")
    run_dir = tmp_path / "run"
    proc = train(2, overrides(data, run_dir), timeout=420)
    assert_ok(proc)
    assert "data: 4 classes in the data, a head of 4 (model.num_classes)" in proc.stdout
    assert_learned(run_dir)


@pytest.fixture
def readonly_json_shards(json_label_shards: Path, tmp_path: Path):
    """The png/webp + JSON shards behind a read-only bind mount; the plain directory when not root."""
    if os.geteuid() != 0:
        print("read-only mount skipped (needs root): training from the writable directory instead")
        yield json_label_shards
        return
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(json_label_shards), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.timeout(600)
def test_png_webp_json_labels_on_a_read_only_mount_learn(readonly_json_shards: Path, tmp_path: Path) -> None:
    src = readonly_json_shards
    data = index(tmp_path / "json.json", f"{src}/train-*.tar", "--val", src / "val-0.tar", "--label", "json:label")
    run_dir = tmp_path / "run"
    assert_ok(train(2, overrides(data, run_dir), timeout=420))
    assert_learned(run_dir)
    assert not any(p.suffix == ".json" for p in src.iterdir())  # nothing was written beside the shards


@pytest.mark.timeout(300)
def test_ranks_refuse_a_head_too_small_for_the_data(shardwriter_shards: Path, tmp_path: Path) -> None:
    data = index(tmp_path / "wds.json", f"{shardwriter_shards}/train-*.tar", "--val", shardwriter_shards / "val-*.tar")
    proc = train(2, overrides(data, tmp_path / "run", "model.num_classes=3"))
    assert proc.returncode != 0
    assert f"{data} has 4 classes but model.num_classes=3: labels up to 3 do not fit the head" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step
