"""The real entry point on 2 CPU ranks (torchrun, gloo, DeepSpeed ZeRO) with real shards.

Numbers, not just exit codes: losses fall, resumed runs reproduce the uninterrupted run's losses
and weights bit for bit, a universal (2 -> 1 rank) resume reloads the saved weights, a compiled
run (train.compile) resumes from an eager checkpoint and back on the same losses, and
non-finite steps are skipped, rolled back and finally refused with the step range.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from launch.memory_plan import memory_plan
from pipeline.config import load_config
from tests.train.conftest import (
    SMOKE,
    assert_ok,
    assert_same_state,
    kill_group,
    losses,
    metrics,
    start_training,
    train,
    wait_for,
)

STEPS = 20  # 360 train samples / 32 per step: the run crosses an epoch boundary at step 11


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=5", "tracking.enabled=false", "optim.warmup_steps=3", *extra,
    ]  # fmt: skip


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ZeRO-2 run: the baseline the resume tests must reproduce."""
    run_dir = tmp_path_factory.mktemp("train") / "reference"
    assert_ok(train(2, overrides(synthetic_shards, run_dir, "train.zero_stage=2")))
    return run_dir


def _assert_learned(run_dir: Path) -> None:
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(16, 21)) / 5
    assert last < 0.7 * first, f"loss did not fall enough: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert metrics(run_dir)[STEPS]["eval/top1"] >= 0.9


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_learns(stage: int, reference: Path, synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir = reference
    if stage != 2:
        run_dir = tmp_path / f"zero{stage}"
        assert_ok(train(2, overrides(synthetic_shards, run_dir, f"train.zero_stage={stage}")))
    _assert_learned(run_dir)
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMMITTED").exists())
    assert complete == ["step_00000010", "step_00000015", "step_00000020"]  # keep_last=3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000020"


@pytest.mark.timeout(600)  # includes the reference run (fixture); 300 s ran out on a loaded 2-core machine
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_mid_checkpoint_then_resume_is_bit_identical(
    async_save: bool, reference: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    extra = ["train.zero_stage=2", f"checkpoint.async_save={str(async_save).lower()}"]
    # The last rank stalls after writing its shards of step `held` (a background save: its writer
    # thread stalls while training goes on); SIGKILL the job inside that window.
    held, previous = (15, 10) if async_save else (20, 15)
    job = start_training(
        2, overrides(synthetic_shards, run_dir, *extra), env={"PIPELINE_TEST_SAVE_PAUSE": f"60@{held}"},
        log=tmp_path / "killed.log",
    )  # fmt: skip
    partial = ckpts / f"step_{held:08d}"
    wait_for(lambda: (partial / "trainer_state.json").exists(), 180, f"the step-{held} save to start")
    if async_save:  # training went on while the save was being written
        went_on = f"step {held + 2}/{STEPS} | loss"
        wait_for(lambda: went_on in (tmp_path / "killed.log").read_text(), 120, "training to go on past the save")
    kill_group(job)
    assert not (partial / "COMMITTED").exists()
    assert (ckpts / "latest").read_text() == f"step_{previous:08d}"
    if async_save:  # a background save writes what a synchronous one writes (the reference's)
        for f in sorted((ckpts / "step_00000010").glob("*.pt")):
            a, b = (
                torch.load(d / "step_00000010" / f.name, weights_only=False) for d in (reference / "checkpoints", ckpts)
            )
            assert_same_state(a, b, f.name)
        _assert_staging_planned(ckpts / "step_00000010", overrides(synthetic_shards, run_dir, *extra))

    resumed = train(2, overrides(synthetic_shards, run_dir, *extra))
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and f"step_{previous:08d}" in resumed.stdout
    ref, got = losses(reference), losses(run_dir)
    assert [got[s] for s in range(previous + 1, 21)] == [ref[s] for s in range(previous + 1, 21)]  # exact equality
    # The killed attempt's lines for the later steps were superseded by the resumed run's: one line each.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines if "train/loss" in rec] == list(range(1, STEPS + 1))
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    if async_save:
        assert sorted(p.name for p in ckpts.glob("step_*") if (p / "COMMITTED").exists()) == [
            "step_00000010", "step_00000015", "step_00000020"
        ]  # fmt: skip


def _assert_staging_planned(tag_dir: Path, overrides: list[str]) -> None:
    """`--dry-run`'s host memory for background saves is the shards each rank wrote (within 5 %)."""
    marker = json.loads((tag_dir / "COMMITTED").read_text())
    writers, sizes = marker["checksums"]["writers"], marker["files"]
    shards = [
        sum(n for f, n in sizes.items() if writers.get(f) == rank and f.endswith("_states.pt")) for rank in (0, 1)
    ]
    plan = memory_plan(load_config(SMOKE, overrides), nodes=2, gpus_per_node=0)
    assert shards == pytest.approx(list(plan.checkpoint_staging), rel=0.05)


@pytest.mark.timeout(300)
def test_usr2_save_waits_for_the_background_save_in_flight(synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir, ckpts = tmp_path / "usr2", tmp_path / "usr2" / "checkpoints"
    extra = ["checkpoint.async_save=true", "checkpoint.every_steps=4", "checkpoint.export_final=false"]
    # The step-4 background save is held 15 s; USR2 arrives meanwhile, and its save must wait for it.
    job = start_training(
        2, overrides(synthetic_shards, run_dir, *extra), env={"PIPELINE_TEST_SAVE_PAUSE": "15@4"},
        log=tmp_path / "usr2.log",
    )  # fmt: skip
    wait_for(lambda: (ckpts / "step_00000004" / "trainer_state.json").exists(), 180, "the step-4 save to start")
    ranks = [c for c in psutil.Process(job.pid).children(recursive=True) if "pipeline.train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGUSR2)
    job.wait(timeout=120)
    log = (tmp_path / "usr2.log").read_text()
    saved = re.search(r"saved step (\d+) on the pre-timeout signal", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    assert step > 4
    markers = [json.loads((ckpts / f"step_{s:08d}" / "COMMITTED").read_text()) for s in (4, step)]
    assert markers[0]["committed_at"] < markers[1]["committed_at"]  # the in-flight save was committed first
    assert (ckpts / "latest").read_text() == f"step_{step:08d}"


# torch.compile (inductor) reorders and fuses float arithmetic: the same run, not the same bits.
COMPILED_REL_TOL = 1e-4


def _module_keys(tag_dir: Path) -> list[str]:
    return sorted(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"])


@pytest.mark.timeout(900)  # two runs, each pays inductor's compile once (tens of seconds on 2 cores)
def test_compiled_run_resumes_from_eager_and_back_on_the_same_losses(
    reference: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    """train.compile=true from the eager reference's step-10 checkpoint trains steps 11-20 on the eager
    losses; an eager run resumed from the compiled run's step-15 checkpoint ends on the reference's weights."""
    run_dir = tmp_path / "compiled"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "export")
    for tag in ("step_00000020", "step_00000015"):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    compiled = train(2, overrides(synthetic_shards, run_dir, "train.zero_stage=2", "train.compile=true"), timeout=420)
    assert_ok(compiled)
    assert "train.compile: False -> True (honoured)" in compiled.stdout
    ref, got = losses(reference), losses(run_dir)
    assert [got[s] for s in range(11, 21)] == pytest.approx([ref[s] for s in range(11, 21)], rel=COMPILED_REL_TOL)
    # nn.Module.compile in place: the checkpoint's keys are the eager ones (no "_orig_mod." prefix)
    ckpts = run_dir / "checkpoints"
    assert _module_keys(ckpts / "step_00000015") == _module_keys(reference / "checkpoints" / "step_00000015")

    shutil.rmtree(ckpts / "step_00000020")
    shutil.rmtree(run_dir / "export")
    (ckpts / "latest").write_text("step_00000015")
    eager = train(2, overrides(synthetic_shards, run_dir, "train.zero_stage=2"))
    assert_ok(eager)
    assert "resumed from" in eager.stdout and "step_00000015" in eager.stdout
    got = losses(run_dir)
    assert [got[s] for s in range(16, 21)] == pytest.approx([ref[s] for s in range(16, 21)], rel=COMPILED_REL_TOL)
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=COMPILED_REL_TOL, atol=1e-5)


@pytest.mark.timeout(300)
def test_resume_on_one_rank_goes_through_universal_checkpoint(
    reference: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "shrunk"
    shutil.copytree(reference, run_dir)
    for tag in ("step_00000020", "step_00000015"):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    # A fixed global batch keeps the recipe: 1 rank x 16 x accumulation 2 = 32, as 2 x 16 before.
    proc = train(1, overrides(synthetic_shards, run_dir, "train.zero_stage=2", "train.global_batch_size=32"))
    assert_ok(proc)
    assert "converting to a universal checkpoint" in proc.stdout
    line = next(
        ln for ln in proc.stdout.splitlines() if "I [rank 0] pipeline.train.lifecycle: universal resume verified" in ln
    )
    assert float(line.rsplit("= ", 1)[1].split()[0]) < 1e-6
    assert (run_dir / "checkpoints" / "step_00000010_universal").is_dir()
    got, ref = losses(run_dir), losses(reference)
    assert sorted(s for s in got if s > 10) == list(range(11, 21))
    # Other data order on one rank: close to, not equal to, the 2-rank curve.
    assert abs(got[20] - ref[20]) < 0.5
    assert metrics(run_dir)[STEPS]["eval/top1"] >= 0.9


@pytest.mark.timeout(300)
def test_nonfinite_steps_skip_rollback_then_stop(synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    proc = train(
        2, overrides(synthetic_shards, run_dir, "train.zero_stage=0", "train.max_nonfinite_steps=3"),
        env={"PIPELINE_INJECT_NONFINITE": "4,12,13,14"},
    )  # fmt: skip
    assert proc.returncode != 0
    out = proc.stdout
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row)" in out
    assert "steps 12-14 non-finite: rolling back to step_00000010" in out
    assert "non-finite loss/gradients again at steps 12-14 after rolling back once" in out
    m = metrics(run_dir)
    assert m[5]["train/skipped_steps"] == 1.0
    assert all(m[s]["train/loss"] == m[s]["train/loss"] for s in range(5, 12))  # finite again after the skip
    # The skipped step left the weights alone: loss keeps falling through it.
    assert m[11]["train/loss"] < m[3]["train/loss"]


@pytest.mark.timeout(300)
def test_same_size_damage_falls_back_to_the_previous_checkpoint_and_ends_identical(
    reference: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "export")
    (run_dir / "checkpoints" / "latest").write_text("step_00000015")  # as if killed after the step-20 commit
    shard = run_dir / "checkpoints" / "step_00000020" / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 4 KB of random bytes in the middle: same size, other weights
        f.seek(size // 2)
        f.write(random.Random(0).randbytes(4096))
    assert shard.stat().st_size == size
    proc = train(2, overrides(synthetic_shards, run_dir, "train.zero_stage=2"))
    assert_ok(proc)
    assert f"skipping incomplete checkpoint step_00000020 (step 20): {shard} does not match its checksum" in proc.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000015'} (step 15, 480 samples seen)" in proc.stdout
    ref, got = losses(reference), losses(run_dir)
    assert [got[s] for s in range(16, 21)] == [ref[s] for s in range(16, 21)]  # retrained 16-20, bit for bit
    a, b = weights(reference), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the fallback run ended with other weights"
    assert metrics(run_dir)[STEPS]["eval/top1"] == metrics(reference)[STEPS]["eval/top1"]


@pytest.mark.timeout(300)
def test_every_checkpoint_damaged_is_refused_never_a_fresh_start(
    reference: Path, synthetic_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "all_damaged"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    for tag in ("step_00000010", "step_00000015", "step_00000020"):
        state = run_dir / "checkpoints" / tag / "trainer_state.json"
        state.write_bytes(b" " * state.stat().st_size)  # same size, no JSON
    proc = train(2, overrides(synthetic_shards, run_dir, "train.zero_stage=2"))
    assert proc.returncode != 0
    assert "holds 3 checkpoint(s) (step_00000010 .. step_00000020) but none is complete and intact" in proc.stdout
    for tag in ("step_00000010", "step_00000015", "step_00000020"):
        assert f"{run_dir / 'checkpoints' / tag / 'trainer_state.json'} does not match its checksum" in proc.stdout
    assert not (run_dir / "metrics.jsonl").exists()  # not one step trained
