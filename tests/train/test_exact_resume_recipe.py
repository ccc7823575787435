"""Exact resume under the shipped recipes' randomness: mixup, cutmix, label smoothing, drop path,
dropout and gradient checkpointing all on, two micro-steps per step, on 2 real DeepSpeed ranks.

Each draw is a function of (seed, rank, step, micro-step) (pipeline/data/mix.py, loop._seed_forward)
and the crops are seeded by the batch's identity (pipeline/data/slots.py), so a run killed with
SIGKILL and resumed reproduces every later loss and the final weights with ``==``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import assert_ok, kill_group, losses, start_training, train, wait_for

STEPS = 20
RECIPE = (
    "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.label_smoothing=0.1", "model.drop_path_rate=0.1",
    "model.dropout=0.1", "model.emb_dropout=0.1", "model.grad_checkpointing=true",
    "train.micro_batch_size=8", "train.grad_accum=2",  # 8 x 2 micro-steps x 2 ranks = 32 per step
)  # fmt: skip


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=5", "tracking.enabled=false", "optim.warmup_steps=3", "train.zero_stage=2",
        *RECIPE,
    ]  # fmt: skip


@pytest.mark.timeout(600)
def test_kill_then_resume_is_bit_identical_with_mixup_cutmix_drop_path_and_dropout(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    assert_ok(train(2, overrides(synthetic_shards, reference), timeout=400))

    run_dir = tmp_path / "killed"
    # The last rank stalls after writing its step-20 shards; SIGKILL the job inside that window.
    job = start_training(
        2, overrides(synthetic_shards, run_dir), env={"PIPELINE_TEST_SAVE_PAUSE": "60@20"}, log=tmp_path / "killed.log"
    )
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000020" / "trainer_state.json").exists(), 300, "step-20 save")
    kill_group(job)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000015"

    resumed = train(2, overrides(synthetic_shards, run_dir), timeout=400)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "step_00000015" in resumed.stdout
    ref, got = losses(reference), losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(16, STEPS + 1)] == [ref[s] for s in range(16, STEPS + 1)]  # exact equality
    a = load_file(str(reference / "export" / "model.safetensors"))
    b = load_file(str(run_dir / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
