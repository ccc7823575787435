"""The batch arithmetic of a run: micro batch x accumulation x world size = global batch.

The config validates the arithmetic when it loads (``TrainConfig.grad_accum_for``); the engine
plans with it here, for the world size the job actually has.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int  # per rank, per forward pass
    grad_accum: int
    global_batch_size: int  # samples per optimizer step, all ranks
    world_size: int


def plan_batch(train: TrainConfig, world_size: int) -> BatchPlan:
    """Micro batch, accumulation and global batch of ``train`` at ``world_size`` ranks."""
    accum = train.grad_accum_for(world_size)
    return BatchPlan(train.micro_batch_size, accum, train.micro_batch_size * accum * world_size, world_size)
