"""Checkpoint bookkeeping: commit markers, the latest pointer, fall-backs, pruning (no DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.train.checkpoint import (
    CheckpointError,
    commit,
    inspect_run_dir,
    prune,
    resolve_checkpoint,
    tag_for,
    verify,
)


def make(run_dir: Path, step: int, *, complete: bool = True, files: dict[str, bytes] | None = None) -> Path:
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 10, "zero_pp_rank_1.pt": b"y" * 5}).items():
        (tag_dir / name).write_bytes(data)
    if complete:
        commit(tag_dir, {"step": step, "samples_seen": 32 * step, "world_size": 2, "zero_stage": 2})
    return tag_dir


def test_newest_complete_checkpoint_is_chosen(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20)
    info = inspect_run_dir(tmp_path)
    assert (info.tag, info.step, info.samples_seen, info.world_size) == ("step_00000020", 20, 640, 2)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000020"
    marker = json.loads((tmp_path / "checkpoints/step_00000020/COMMITTED").read_text())
    assert marker["files"] == {"mp_rank_00_model_states.pt": 10, "zero_pp_rank_1.pt": 5}
    tag_dir = make(tmp_path, 30, complete=False, files={"a.pt": b"x" * 7, "b.pt": b"y" * 4})
    assert commit(tag_dir, {"step": 30}) == 11  # the bytes the marker lists (logged as the save size)


def test_no_checkpoints_means_a_fresh_start(tmp_path: Path) -> None:
    assert inspect_run_dir(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert inspect_run_dir(tmp_path) is None


def test_partial_newest_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20, complete=False)
    assert inspect_run_dir(tmp_path).step == 10
    assert "skipping incomplete checkpoint" in caplog.text


def test_damaged_shard_makes_a_checkpoint_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make(tmp_path, 10)
    newest = make(tmp_path, 20)
    (newest / "zero_pp_rank_1.pt").write_bytes(b"y")  # truncated after the commit
    assert verify(newest) is None
    assert inspect_run_dir(tmp_path).step == 10
    assert "zero_pp_rank_1.pt is missing or has the wrong size" in caplog.text


@pytest.mark.parametrize("latest", [None, "", "step_00000030"])
def test_latest_missing_empty_or_pointing_at_a_partial(tmp_path: Path, latest: str | None) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    pointer = tmp_path / "checkpoints" / "latest"
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_text(latest)
    assert inspect_run_dir(tmp_path).step == 20  # the newest complete one, never a fresh start


def test_only_partial_checkpoints_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    make(tmp_path, 10, complete=False)
    make(tmp_path, 20, complete=False)
    with pytest.raises(
        CheckpointError, match=r"holds 2 checkpoint\(s\) .* but none is complete.*Refusing to start fresh"
    ):
        inspect_run_dir(tmp_path)


def test_prune_keeps_the_newest_complete_and_inflight_partials(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        make(tmp_path, step)
    make(tmp_path, 25, complete=False)  # stale partial, older than the newest complete
    make(tmp_path, 50, complete=False)  # a save in flight
    prune(tmp_path / "checkpoints", keep_last=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert left == ["step_00000030", "step_00000040", "step_00000050"]


def test_resolve_checkpoint_accepts_run_dir_checkpoints_dir_or_tag(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20)
    assert resolve_checkpoint(tmp_path).step == 20
    assert resolve_checkpoint(tmp_path / "checkpoints").step == 20
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step_00000010").step == 10
    partial = make(tmp_path, 30, complete=False)
    with pytest.raises(CheckpointError, match=r"step_00000030 is not a complete checkpoint"):
        resolve_checkpoint(partial)
    with pytest.raises(CheckpointError, match=r"holds no checkpoints"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_checkpoint_of_another_model_or_stage_is_refused_before_training(tmp_path: Path) -> None:
    from pipeline.config import config_to_dict, load_config
    from pipeline.train.dist_env import DistEnv
    from pipeline.train.setup import _resume_info

    saved = load_config(None, ["model.dim=96", "model.depth=6"])
    tag_dir = make(tmp_path, 10)
    marker = json.loads((tag_dir / "COMMITTED").read_text())
    (tag_dir / "COMMITTED").write_text(json.dumps({**marker, "model": config_to_dict(saved.model)}))
    env = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "single")
    cfg = load_config(None, [f"train.run_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"written for another model: model\.dim: checkpoint 96 vs config 64; "
                                              r"model\.depth: checkpoint 6 vs config 4"):  # fmt: skip
        _resume_info(cfg, env, tmp_path)
    assert _resume_info(load_config(None, ["model.dim=96", "model.depth=6"]), env, tmp_path).step == 10
    with pytest.raises(CheckpointError, match=r"written with ZeRO stage 2; set train.zero_stage=2"):
        _resume_info(load_config(None, ["model.dim=96", "model.depth=6", "train.zero_stage=3"]), env, tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume=require but .* has no checkpoints"):
        _resume_info(load_config(None, ["checkpoint.resume=require"]), env, tmp_path / "new")
