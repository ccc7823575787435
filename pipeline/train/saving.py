"""The collective checkpoint save: every rank's shards, RNG states and data position, then the commit.

A checkpoint counts only once rank 0 has written COMMITTED, after every rank's files are on disk
and checksummed (pipeline.train.checkpoint commits; pipeline.artifacts.checkpoints reads).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from pipeline.artifacts import checkpoints as stored
from pipeline.config import config_to_dict
from pipeline.durable import atomic_write
from pipeline.train import checkpoint as ckpt
from pipeline.train import engine as ds
from pipeline.train import rng

if TYPE_CHECKING:
    from pipeline.train.lifecycle import Run

log = logging.getLogger(__name__)

# Test hook, "SECONDS@STEP": the last rank sleeps that long between writing its shards of the
# step-STEP checkpoint and the commit barrier, so a test can kill the job mid-checkpoint.
SAVE_PAUSE_ENV = "PIPELINE_TEST_SAVE_PAUSE"


def save_checkpoint(r: Run) -> Path:
    """Collective save; the checkpoint counts only once COMMITTED is on disk (see checkpoint.py)."""
    ckpt_dir = stored.checkpoints_dir(r.run_dir)
    tag = stored.tag_for(r.state.step)
    tag_dir = ckpt_dir / tag
    if r.env.rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a partial left by a killed job at this same step
    dist.barrier()
    t0 = time.perf_counter()
    written = ds.save(r.engine, ckpt_dir, tag)
    written.append(rng.save(tag_dir, r.env.rank))
    written.append(stored.loader_file(tag_dir, r.env.rank))
    atomic_write(written[-1], json.dumps(r.train_loader.state_dict()))
    if r.env.rank == 0:
        state = r.state.to_dict(loader=r.train_loader.state_dict(), config=config_to_dict(r.cfg))
        ckpt.write_state(tag_dir, {**state, "run_id": r.tracker.run_id})
        written.append(tag_dir / stored.STATE)
    checksums = ckpt.fsync_and_checksum(tag_dir, written)  # by the writer, bytes still in the page cache
    seconds, _, at_step = os.environ.get(SAVE_PAUSE_ENV, "").partition("@")
    if seconds and int(at_step or -1) == r.state.step and r.env.rank == r.env.world_size - 1:
        time.sleep(float(seconds))
    checksums_by_rank = ds.all_gather(checksums)  # collective: every rank's files are on disk
    if r.env.rank == 0:
        gb = ckpt.commit(tag_dir, _marker(r), checksums_by_rank) / 1e9
        ckpt.prune(ckpt_dir, r.cfg.checkpoint.keep_last)
    dist.barrier()
    if r.env.rank == 0:
        seconds = time.perf_counter() - t0
        log.info("checkpoint %s committed: %.3f GB in %.2f s (%.2f GB/s)", tag_dir, gb, seconds, gb / seconds)
    return tag_dir


def _marker(r: Run) -> dict:
    return {
        "step": r.state.step,
        "samples_seen": r.state.samples_seen,
        "world_size": r.env.world_size,
        "zero_stage": r.cfg.train.zero_stage,
        "precision": r.cfg.train.precision,
        "model": config_to_dict(r.cfg.model),
    }
