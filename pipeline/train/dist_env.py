"""The one seam that finds rank, world size and the rendezvous address.

It understands torchrun/launcher variables (RANK, WORLD_SIZE, ...) first and SLURM's (SLURM_PROCID,
SLURM_NTASKS, ...) second, and refuses a half-set environment instead of guessing (DINOv2's
``distributed.enable()`` does the same). No variables at all means one local process.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Literal

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


class DistEnvError(RuntimeError):
    """The distributed environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Literal["torchrun", "slurm", "single"]

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    def export(self) -> None:
        """Set the torchrun-style variables that torch.distributed and DeepSpeed read."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def port_for_job(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A rendezvous port derived from the job id, so concurrent jobs on one node do not collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return base + int(digits) % span


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list ("node[1-3],gpu7" -> "node1"), via scontrol when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", head)
    if not m:
        return head
    first = re.split(r"[-,]", m.group(2))[0]
    return m.group(1) + first


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _half_set(names: tuple[str, ...], kind: str, fix: str) -> None:
    present = [n for n in names if n in os.environ]
    missing = [n for n in names if n not in os.environ]
    if present and missing:
        raise DistEnvError(
            f"half-set {kind} environment: {', '.join(present)} set but {', '.join(missing)} missing; {fix}"
        )


def _from_torchrun() -> DistEnv:
    world = _int_env("WORLD_SIZE")
    local_world = _int_env("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world
    env = DistEnv(
        rank=_int_env("RANK"),
        world_size=world,
        local_rank=_int_env("LOCAL_RANK"),
        local_world_size=local_world,
        master_addr=os.environ["MASTER_ADDR"],
        master_port=_int_env("MASTER_PORT"),
        source="torchrun",
    )
    return _checked(env)


def _slurm_tasks_per_node() -> int:
    # "2(x3)" or "2,1": tasks on this job step's nodes; we launch equal tasks per node.
    raw = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", raw)
    if m:
        return int(m.group(1))
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return _int_env("SLURM_NTASKS_PER_NODE")
    return _int_env("SLURM_NTASKS")


def _from_slurm() -> DistEnv:
    env = DistEnv(
        rank=_int_env("SLURM_PROCID"),
        world_size=_int_env("SLURM_NTASKS"),
        local_rank=_int_env("SLURM_LOCALID"),
        local_world_size=_slurm_tasks_per_node(),
        master_addr=first_host(os.environ["SLURM_JOB_NODELIST"]),
        master_port=port_for_job(os.environ["SLURM_JOB_ID"]),
        source="slurm",
    )
    return _checked(env)


def _checked(env: DistEnv) -> DistEnv:
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"rank {env.rank} is outside world size {env.world_size} ({env.source} environment)")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(
            f"local rank {env.local_rank} is outside local world size {env.local_world_size} ({env.source} environment)"
        )
    return env


def detect() -> DistEnv:
    """Rank, world size and rendezvous for this process; see the module docstring for the order."""
    _half_set(TORCHRUN_VARS, "torchrun", "launch with torchrun/deepspeed/launch/submit.py, or unset them all")
    if all(n in os.environ for n in TORCHRUN_VARS):
        return _from_torchrun()
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        # Inside `srun`: a job step; the batch script itself (no step) is a single process.
        _half_set(SLURM_VARS, "SLURM", "run the ranks with srun inside an allocation, or unset SLURM_* variables")
        return _from_slurm()
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
