"""Resuming with a changed config, on real DeepSpeed ranks: every change honoured (and said) or refused.

A 10-step, 2-rank run is the checkpoint each test resumes (from a copy): raising train.steps trains
on to the new count on the re-stretched schedule; lowering it below the checkpoint ends the run; a
recipe change is refused by the ranks and by the launcher before anything is queued, with the same
message; 2 -> 1 ranks keeps the global batch with the accumulation re-derived; a run dir that cannot
hold keep_last + 1 checkpoints is warned about, and the save that runs out of space names its step
and path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launch import checks, submit
from pipeline.config import load_config
from pipeline.train.recipe import Schedule
from tests.train.conftest import SMOKE, assert_ok, metrics, train

STEPS = 10


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=5", "tracking.enabled=false", "optim.warmup_steps=3", "train.zero_stage=2", *extra,
    ]  # fmt: skip


def state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def base(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "base"
    assert_ok(train(2, overrides(synthetic_shards, run_dir), timeout=600))
    return run_dir


def copy_of(base: Path, tmp_path: Path, *, drop: tuple[int, ...] = ()) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    for step in drop:
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    return run_dir


@pytest.mark.timeout(900)
def test_raising_steps_trains_on_to_the_new_count_on_the_restretched_schedule(
    base: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = copy_of(base, tmp_path, drop=(10,))  # resume mid-decay, from step 5
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    proc = train(2, overrides(synthetic_shards, run_dir, "train.steps=15", "train.eval_every=5"), timeout=600)
    assert_ok(proc)
    assert (
        "resume: train.steps: 10 -> 15 (honoured): the run now ends at step 15; the learning rate's remaining decay "
        "is re-stretched from its current value at step 5 to optim.min_lr at step 15 (warmup kept)" in proc.stdout
    )
    assert "resume: train.eval_every: 0 -> 5 (honoured)" in proc.stdout
    m, old = metrics(run_dir), metrics(base)
    assert sorted(s for s in m if s > 5 and "train/loss" in m[s]) == list(range(6, 16))
    assert all("eval/top1" in m[s] for s in (10, 15))
    saved = Schedule(**state(base, 5)["schedule"])
    assert (saved.total_samples, saved.warmup_samples) == (320, 96)  # 10 and 3 steps x 32
    stretched = saved.stretch(160, 480)
    assert [m[s]["train/lr"] for s in range(6, 16)] == [stretched.lr(32 * s) for s in range(6, 16)]
    # Continuous at step 5, then a slower decay than the 10-step run's, ending at min_lr at step 15.
    assert m[5]["train/lr"] == old[5]["train/lr"] == saved.lr(160)
    assert all(m[s]["train/lr"] > old[s]["train/lr"] for s in range(6, 11))
    assert m[15]["train/lr"] == pytest.approx(saved.min_lr) and m[14]["train/lr"] > saved.min_lr
    final = state(run_dir, 15)
    assert (final["step"], final["samples_seen"]) == (15, 480)
    assert (final["schedule"]["total_samples"], final["schedule"]["anchor_samples"]) == (480, 160)
    assert final["config"]["train"]["steps"] == 15


@pytest.mark.timeout(900)
def test_lowering_steps_below_the_checkpoint_ends_the_run_there(
    base: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = copy_of(base, tmp_path)
    proc = train(2, overrides(synthetic_shards, run_dir, "train.steps=6"), timeout=600)
    assert_ok(proc)
    assert (
        "resume: train.steps: 10 -> 6 (honoured): the checkpoint is already at step 10, so nothing is left to "
        "train; the run ends at step 10 (final evaluation and export)" in proc.stdout
    )
    assert "this run is already complete" in proc.stdout
    assert max(metrics(run_dir)) == STEPS


@pytest.mark.timeout(900)
def test_a_recipe_change_is_refused_by_the_launcher_and_by_the_ranks(
    base: Path, synthetic_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = copy_of(base, tmp_path)
    changed = ("optim.lr=0.001", "data.mixup_alpha=0.8", "train.log_every=2")
    message = (
        "resuming would change the run's recipe: data.mixup_alpha: checkpoint 0.0, now 0.8; optim.lr: checkpoint "
        "0.002, now 0.001. A resumed run keeps the model, optimizer, data and augmentation of its checkpoint; set "
        "them back (data.mixup_alpha=0.0 optim.lr=0.002) to resume it, or pass another train.run_dir"
    )
    keys = [o for o in overrides(synthetic_shards, run_dir, *changed) if not o.startswith("train.run_dir=")]
    launcher = ["--config", str(SMOKE), "--nodes", "2", "--run-dir", str(run_dir), "--local", *keys]
    assert submit.main(launcher) == 1
    err = capsys.readouterr().err
    assert message in err and "nothing was submitted" in err
    assert not (run_dir / "job.json").exists()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    proc = train(2, overrides(synthetic_shards, run_dir, *changed), timeout=600)
    assert proc.returncode != 0
    assert message in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert max(metrics(run_dir)) == STEPS


@pytest.mark.timeout(900)
def test_one_rank_keeps_the_global_batch_with_the_accumulation_rederived(
    base: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = copy_of(base, tmp_path, drop=(10,))
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    cfg = load_config(SMOKE, [*overrides(synthetic_shards, run_dir), "launch.nodes=1", "launch.ranks_per_node=1"])
    note = "global batch kept at the checkpoint's 32 = 16 x accumulation 2 x 1 ranks (saved as 16 x 1 x 2 ranks)"
    assert f"\n  resume: {note}" in checks.check_resume(cfg, run_dir)  # what the launcher prints before queueing

    proc = train(1, overrides(synthetic_shards, run_dir), timeout=600)  # no train.global_batch_size given
    assert_ok(proc)
    assert f"resume: {note}" in proc.stdout
    assert "global batch 32 = 16 x 2 x 1 ranks" in proc.stdout
    m = metrics(run_dir)
    assert sorted(s for s in m if s > 5 and "train/loss" in m[s]) == [6, 7, 8, 9, 10]
    assert [m[s]["train/samples_seen"] for s in range(6, 11)] == [32.0 * s for s in range(6, 11)]
    final = state(run_dir, STEPS)
    assert (final["step"], final["samples_seen"]) == (10, 320)
    assert final["config"]["train"]["global_batch_size"] == 32  # pinned from now on
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch_size"] == 32


@pytest.fixture
def small_disk(tmp_path: Path, base: Path):
    """A real tmpfs with room for ~2.5 of the base run's checkpoints (root only: it mounts)."""
    one = sum(f.stat().st_size for f in (base / "checkpoints" / "step_00000005").rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * one)}", "tmpfs", str(mount)], check=True)
    try:
        yield mount, one
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.timeout(900)
def test_a_disk_too_small_for_keep_last_is_warned_about_and_the_failed_save_named(
    small_disk: tuple[Path, int], synthetic_shards: Path
) -> None:
    mount, one = small_disk
    run_dir = mount / "run"
    proc = train(2, overrides(synthetic_shards, run_dir, "train.steps=20", "checkpoint.keep_last=3"), timeout=600)
    out = proc.stdout
    assert proc.returncode != 0
    ckpt_dir = run_dir / "checkpoints"
    assert f"a later checkpoint will not fit: at step 0, {ckpt_dir} has " in out  # at start-up, from the estimate
    assert f"a later checkpoint will not fit: at step 10, {ckpt_dir} has " in out  # 1.5 free + 1 held < 4
    assert f"the next checkpoint will not fit: at step 15, {ckpt_dir} has " in out
    assert "checkpoint.keep_last=3 plus the one being written need 4 x" in out
    assert f"no space left on device while saving the step-15 checkpoint to {ckpt_dir / 'step_00000015'}" in out
    assert "lower checkpoint.keep_last (now 3), or point train.run_dir at a larger filesystem" in out
    assert (ckpt_dir / "latest").read_text() == "step_00000010"  # the newest complete checkpoint is intact
