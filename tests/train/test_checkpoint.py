"""Checkpoint bookkeeping: commit markers, the latest pointer, fall-backs, pruning (no DeepSpeed)."""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import pytest

from pipeline.artifacts.checkpoints import (
    CheckpointError,
    check_tag,
    checksum_files,
    checksum_share,
    inspect_run_dir,
    read_state,
    resolve_checkpoint,
    tag_for,
    verify,
)
from pipeline.train.checkpoint import commit, prune


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
    from pipeline.train.lifecycle import _resume_info

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


def _flip(path: Path, offset: int, length: int = 4096) -> None:
    """Overwrite ``length`` bytes at ``offset`` with their complement: same size, other bytes."""
    data = bytearray(path.read_bytes())
    data[offset : offset + length] = bytes(255 - b for b in data[offset : offset + length])
    path.write_bytes(bytes(data))


def _make_realistic(run_dir: Path, step: int) -> Path:
    """A checkpoint shaped like a 2-rank save: shards, RNG files, trainer state, checksums by writer."""
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    rng = random.Random(step)
    by_rank: list[dict[str, str]] = []
    for rank in (0, 1):
        written = [tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", tag_dir / f"rng_rank{rank}.pt"]
        if rank == 0:
            written.append(tag_dir / "mp_rank_00_model_states.pt")
        for p in written:
            p.write_bytes(rng.randbytes(20_000))
        if rank == 0:
            (tag_dir / "trainer_state.json").write_text(json.dumps({"step": step, "samples_seen": 32 * step}))
            written.append(tag_dir / "trainer_state.json")
        by_rank.append(checksum_files(tag_dir, written))
    (tag_dir / "zero_to_fp32.py").write_text("# copied by DeepSpeed, claimed by no rank\n")
    commit(tag_dir, {"step": step, "samples_seen": 32 * step, "world_size": 2, "zero_stage": 2}, by_rank)
    return tag_dir


def test_marker_records_a_checksum_per_file_and_its_writer(tmp_path: Path) -> None:
    tag_dir = _make_realistic(tmp_path, 10)
    marker = json.loads((tag_dir / "COMMITTED").read_text())
    sums = marker["checksums"]
    assert sums["algorithm"] == "crc32"
    assert sorted(sums["files"]) == sorted(marker["files"])  # every listed file has a checksum
    assert sums["files"]["zero_to_fp32.py"] == f"{zlib.crc32((tag_dir / 'zero_to_fp32.py').read_bytes()):08x}"
    assert sums["writers"]["rng_rank1.pt"] == 1 and sums["writers"]["mp_rank_00_model_states.pt"] == 0
    assert "zero_to_fp32.py" not in sums["writers"]
    # Each rank verifies the files it wrote; unclaimed ones are dealt out, so together they read all once.
    share0, share1 = checksum_share(marker, 0, 2), checksum_share(marker, 1, 2)
    assert "rng_rank1.pt" in share1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in share1
    assert "mp_rank_00_model_states.pt" in share0 and "trainer_state.json" in share0
    assert sorted(share0 + share1) == sorted(sums["files"]) and not set(share0) & set(share1)
    # At another world size the writers mean nothing: round-robin over the new ranks.
    thirds = [checksum_share(marker, r, 3) for r in range(3)]
    assert sorted(sum(thirds, [])) == sorted(sums["files"]) and [len(t) for t in thirds] == [3, 2, 2]


def test_same_size_damage_in_a_shard_falls_back_naming_file_and_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_realistic(tmp_path, 10)
    newest = _make_realistic(tmp_path, 20)
    shard = newest / "mp_rank_00_model_states.pt"
    _flip(shard, 8192)
    assert shard.stat().st_size == 20_000 and verify(newest) is not None  # sizes alone see nothing
    # A rank whose share does not hold the shard finds nothing; the union of the ranks' findings does.
    assert check_tag(newest, rank=1, world_size=2, max_bytes=None)[0] is not None
    committed = json.loads((newest / "COMMITTED").read_text())["checksums"]["files"]["mp_rank_00_model_states.pt"]
    marker, problems = check_tag(newest, max_bytes=None)
    found = f"{zlib.crc32(shard.read_bytes()):08x}"
    assert marker is None and problems == [
        f"{shard} does not match its checksum (crc32 {found}, committed {committed})"
    ]
    info = inspect_run_dir(tmp_path, max_bytes=None)
    assert (info.tag, info.step) == ("step_00000010", 10)
    assert f"skipping incomplete checkpoint step_00000020 (step 20): {shard} does not match its checksum" in caplog.text
    assert "falling back to the previous one" in caplog.text


def test_garbage_trainer_state_of_the_same_size_falls_back_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_realistic(tmp_path, 10)
    newest = _make_realistic(tmp_path, 20)
    state = newest / "trainer_state.json"
    state.write_bytes(random.Random(0).randbytes(state.stat().st_size))
    # The launcher's preflight (small files hashed, big ones by size) already sees it.
    info = inspect_run_dir(tmp_path)
    assert info.step == 10
    assert f"step_00000020 (step 20): {state} does not match its checksum" in caplog.text
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state))} is unreadable \("):
        read_state(newest)


def test_every_checkpoint_damaged_is_an_error_naming_each_file(tmp_path: Path) -> None:
    first, second = _make_realistic(tmp_path, 10), _make_realistic(tmp_path, 20)
    _flip(first / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 0)
    (second / "trainer_state.json").write_text("x" * (second / "trainer_state.json").stat().st_size)
    with pytest.raises(CheckpointError) as e:
        inspect_run_dir(tmp_path, max_bytes=None)
    msg = str(e.value)
    assert "holds 2 checkpoint(s) (step_00000010 .. step_00000020) but none is complete and intact" in msg
    assert f"step_00000020: {second / 'trainer_state.json'} does not match its checksum" in msg
    assert f"step_00000010: {first / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'} does not match" in msg
    assert "Refusing to start fresh over them" in msg


def test_old_checkpoint_without_checksums_loads_by_sizes_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag_dir = make(tmp_path, 10, files={"mp_rank_00_model_states.pt": b"x" * 10, "trainer_state.json": b'{"step": 10}'})
    marker = json.loads((tag_dir / "COMMITTED").read_text())
    del marker["checksums"]  # as written before checksums were recorded
    (tag_dir / "COMMITTED").write_text(json.dumps(marker))
    assert inspect_run_dir(tmp_path).step == 10
    assert (
        f"checkpoint {tag_dir} has no checksums (written before they were recorded): verified by file sizes only"
        in (caplog.text)
    )
    # Without checksums a garbage trainer state is still caught: it must parse.
    (tag_dir / "trainer_state.json").write_bytes(b"\xff" * 12)
    with pytest.raises(CheckpointError, match=r"trainer_state.json is unreadable"):
        inspect_run_dir(tmp_path)


def test_reading_a_damaged_torch_file_names_it(tmp_path: Path) -> None:
    from pipeline.artifacts.checkpoints import read_torch
    from pipeline.train.engine import consolidated_state_dict

    rng = tmp_path / "rng_rank1.pt"
    rng.write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(rng))} is unreadable \(\w+"):
        read_torch(rng)
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt is unreadable"):
        consolidated_state_dict(tmp_path, zero_stage=0)
