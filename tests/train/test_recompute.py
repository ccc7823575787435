"""Selective recompute through the real entry point: 2 DeepSpeed ranks with dropout and drop path
on train the same loss curve as without recompute (the replay draws the same masks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import assert_ok, losses, train

STEPS = 6


def overrides(shards: Path, run_dir: Path, recompute: str) -> list[str]:
    return [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
        "checkpoint.every_steps=100", "checkpoint.export_final=false", "tracking.enabled=false",
        "model.dropout=0.1", "model.drop_path_rate=0.1", f"model.recompute={recompute}",
    ]  # fmt: skip


@pytest.mark.timeout(700)
def test_selective_recompute_trains_the_same_losses(synthetic_shards: Path, tmp_path: Path) -> None:
    runs = {mode: tmp_path / mode for mode in ("none", "selective")}
    for mode, run_dir in runs.items():
        assert_ok(train(2, overrides(synthetic_shards, run_dir, mode), timeout=300))
    plain, selective = losses(runs["none"]), losses(runs["selective"])
    assert sorted(plain) == list(range(1, STEPS + 1))
    assert [selective[s] for s in sorted(plain)] == pytest.approx([plain[s] for s in sorted(plain)], rel=1e-5, abs=0)
    assert plain[1] != plain[STEPS]  # the model trained: the losses compare trajectories, not a constant
