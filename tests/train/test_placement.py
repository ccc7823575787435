"""The rank's CPU budget: from SLURM's allocation, not from the machine's core count."""

from __future__ import annotations

import os

import pytest

from pipeline.train.dist_env import DistEnv
from pipeline.train.placement import _ranges, cpu_budget, plan_cpus

HERE = len(os.sched_getaffinity(0))  # the CPUs this test process may use


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_CPU_BIND", "SLURM_CPU_BIND_TYPE"):
        monkeypatch.delenv(name, raising=False)


def _env(local_rank: int = 0, local_world: int = 1, rank: int = 0, world: int = 1) -> DistEnv:
    return DistEnv(rank, world, local_rank, local_world, "127.0.0.1", 29500, "slurm")


def test_without_a_scheduler_the_usable_cpus_are_shared_by_the_local_ranks() -> None:
    assert cpu_budget(local_world_size=2) == (max(1, HERE // 2), f"{HERE} usable CPUs / 2 local rank(s)")
    plan = plan_cpus(_env(local_world=2, world=2), num_workers=1)
    assert plan.torch_threads == max(1, HERE // 2 - 1) and plan.loader_workers == 1
    assert plan.affinity == tuple(sorted(os.sched_getaffinity(0))) and plan.binding == "none"


def test_slurm_allocation_on_the_node_beats_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # The local test cluster: a node is the whole host, but the job got 1 CPU per task there.
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    plan = plan_cpus(_env(), num_workers=1)
    assert (plan.cpus, plan.torch_threads) == (1, 1)
    assert plan.source == "SLURM_CPUS_ON_NODE=1 / 1 task(s) on this node"
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2(x2)")  # SLURM's compressed list form: this node's count first
    assert cpu_budget(local_world_size=2) == (1, "SLURM_CPUS_ON_NODE=2 / 2 task(s) on this node")


def test_cpus_per_task_wins_and_the_affinity_caps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "64")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu_budget(local_world_size=8) == (1, "SLURM_CPUS_PER_TASK=1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(HERE + 6))  # more than this process may run on
    cpus, source = cpu_budget(local_world_size=1)
    assert cpus == HERE and source == f"SLURM_CPUS_PER_TASK={HERE + 6}, capped by this process's affinity"


def test_loader_workers_and_the_override_split_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setenv("SLURM_CPU_BIND", "quiet,cores")
    plan = plan_cpus(_env(local_rank=1, local_world=2, rank=3, world=4), num_workers=0)
    assert (plan.torch_threads, plan.binding) == (1, "quiet,cores")
    assert plan.describe(_env(local_rank=1, local_world=2, rank=3, world=4)).startswith(
        "cpus: rank 3 (node 1, local rank 1/2) may use 1 CPU(s) (SLURM_CPUS_PER_TASK=1): torch threads 1, "
        "loader workers 0; affinity "
    )
    forced = plan_cpus(_env(), num_workers=4, cpu_threads=3)
    assert forced.torch_threads == 3 and forced.source.endswith("torch threads from train.cpu_threads=3")


def test_cpu_lists_read_like_slurm_writes_them() -> None:
    assert _ranges((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8" and _ranges((3,)) == "3" and _ranges(()) == "none"
