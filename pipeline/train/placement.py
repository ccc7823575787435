"""How many CPUs this rank may use, and how they are split between torch and the data loader.

``os.cpu_count()`` is the wrong number under a scheduler: it counts the whole machine, not the
job's allocation. On the local 2-node test cluster (two SLURM nodes on one 2-core host) each rank
took ``cpu_count() // 1 = 2`` torch threads next to its loader worker, so 2 ranks ran 6 busy threads
on 2 cores and trained 4-10x slower than the same ranks under ``--local`` (bench/RESULTS.md). The
budget comes from the allocation instead, in this order:

1. ``SLURM_CPUS_PER_TASK`` (set when the job asked for ``--cpus-per-task``);
2. ``SLURM_CPUS_ON_NODE // tasks on this node`` (what SLURM gave the job on this node);
3. ``len(os.sched_getaffinity(0)) // local ranks`` (no scheduler: this machine's usable CPUs);

never more than the CPUs this process may run on (its affinity mask: a cgroup or ``--cpu-bind``
binding). Torch gets what the loader workers leave: ``budget - num_workers``, at least 1.
Rank and local world size come from :mod:`pipeline.train.dist_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.train.dist_env import DistEnv


@dataclass(frozen=True)
class CpuPlan:
    cpus: int  # CPUs this rank may use (its share of the allocation)
    source: str  # where ``cpus`` came from, for the job log
    torch_threads: int
    loader_workers: int
    affinity: tuple[int, ...]  # the CPUs the OS lets this process run on
    binding: str  # SLURM's CPU binding for this step, or "none"

    def describe(self, env: DistEnv) -> str:
        return (
            f"cpus: rank {env.rank} (node {env.node_rank}, local rank {env.local_rank}/{env.local_world_size}) "
            f"may use {self.cpus} CPU(s) ({self.source}): torch threads {self.torch_threads}, "
            f"loader workers {self.loader_workers}; affinity {_ranges(self.affinity)} ({len(self.affinity)} CPUs), "
            f"binding {self.binding}"
        )


def _int_var(name: str) -> int | None:
    # SLURM_CPUS_ON_NODE can read "2(x2)" on heterogeneous lists; the leading number is this node's.
    raw = os.environ.get(name, "").split("(")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def cpu_budget(local_world_size: int) -> tuple[int, str]:
    """CPUs one rank may use, and where that number came from (see the module docstring)."""
    affinity = len(os.sched_getaffinity(0))
    per_task = _int_var("SLURM_CPUS_PER_TASK")
    on_node = _int_var("SLURM_CPUS_ON_NODE")
    if per_task is not None:
        budget, source = per_task, f"SLURM_CPUS_PER_TASK={per_task}"
    elif on_node is not None:
        budget = max(1, on_node // local_world_size)
        source = f"SLURM_CPUS_ON_NODE={on_node} / {local_world_size} task(s) on this node"
    else:
        budget = max(1, affinity // local_world_size)
        source = f"{affinity} usable CPUs / {local_world_size} local rank(s)"
    if budget > affinity:
        budget, source = affinity, f"{source}, capped by this process's affinity"
    return budget, source


def plan_cpus(env: DistEnv, *, num_workers: int, cpu_threads: int = 0) -> CpuPlan:
    """The split for this rank; ``cpu_threads`` (train.cpu_threads) > 0 overrides the torch share."""
    cpus, source = cpu_budget(env.local_world_size)
    threads = cpu_threads or max(1, cpus - num_workers)
    if cpu_threads:
        source += f"; torch threads from train.cpu_threads={cpu_threads}"
    binding = os.environ.get("SLURM_CPU_BIND") or os.environ.get("SLURM_CPU_BIND_TYPE") or "none"
    return CpuPlan(cpus, source, threads, num_workers, tuple(sorted(os.sched_getaffinity(0))), binding)


def _ranges(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5", as taskset and SLURM write CPU lists."""
    spans: list[list[int]] = []
    for c in cpus:
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans) or "none"
