"""The collective checkpoint save: every rank's shards, RNG states and data position, then the commit.

A checkpoint counts only once rank 0 has written COMMITTED, after every rank's files are on disk
and checksummed (pipeline.train.checkpoint commits; pipeline.artifacts.checkpoints reads).

Two ways to run it (``checkpoint.async_save``):

* :func:`save_checkpoint`: every rank blocks until the commit.
* :class:`BackgroundSaves`: at the step boundary the ranks snapshot their shards into host memory
  (pipeline.train.staging; DeepSpeed's own save runs, only its file writes are deferred, so the
  layout is unchanged) and training goes on; a thread per rank writes, flushes and checksums the
  files, and the ranks' threads agree, on a gloo group of their own, that every file is durable
  before rank 0 commits. A crash at any moment leaves the previous complete checkpoint, as the
  commit marker and ``latest`` move only at that point. One save is in flight at a time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from pipeline.artifacts import checkpoints as stored
from pipeline.config import config_to_dict
from pipeline.durable import atomic_write
from pipeline.train import checkpoint as ckpt
from pipeline.train import engine as ds
from pipeline.train import rng
from pipeline.train.staging import HostStaging

if TYPE_CHECKING:
    from pipeline.train.lifecycle import Run

log = logging.getLogger(__name__)

# Test hook, "SECONDS@STEP": the last rank sleeps that long between writing its shards of the
# step-STEP checkpoint and the commit barrier (in the background writer for a background save), so a
# test can kill the job mid-checkpoint.
SAVE_PAUSE_ENV = "PIPELINE_TEST_SAVE_PAUSE"


@dataclass(frozen=True)
class _Job:
    """One save: where it goes, and what rank 0 commits."""

    tag_dir: Path
    rank: int
    world_size: int
    step: int
    keep_last: int
    marker: dict[str, Any]
    t0: float


@dataclass(frozen=True)
class _Small:
    """The small per-rank state, captured at the step boundary: RNG states, data position, trainer state."""

    rng: dict[str, Any]
    loader: str
    state: dict[str, Any] | None  # rank 0 only


@dataclass(frozen=True)
class SaveDone:
    tag_dir: Path
    seconds: float  # from the start of the save to its commit


def save_checkpoint(r: Run) -> Path:
    """Collective save; the checkpoint counts only once COMMITTED is on disk (see checkpoint.py)."""
    job = _begin(r)
    written = ds.save(r.engine, job.tag_dir.parent, job.tag_dir.name)
    written += _write_small(job, _capture_small(r))
    checksums = ckpt.fsync_and_checksum(job.tag_dir, written)  # by the writer, bytes still in the page cache
    _pause_for_tests(job)
    _commit(job, ds.all_gather(checksums), group=None)  # collective: every rank's files are on disk
    return job.tag_dir


def _begin(r: Run) -> _Job:
    """Collective: clear a partial left at this step by a killed job."""
    tag_dir = stored.checkpoints_dir(r.run_dir) / stored.tag_for(r.state.step)
    if r.env.rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a partial left by a killed job at this same step
    dist.barrier()
    t0 = time.perf_counter()
    return _Job(tag_dir, r.env.rank, r.env.world_size, r.state.step, r.cfg.checkpoint.keep_last, _marker(r), t0)


def _capture_small(r: Run) -> _Small:
    state = None
    if r.env.rank == 0:
        state = r.state.to_dict(loader=r.train_loader.state_dict(), config=config_to_dict(r.cfg))
        state = copy.deepcopy({**state, "run_id": r.tracker.run_id})  # a background save writes it later
    return _Small(rng=rng.capture(), loader=json.dumps(r.train_loader.state_dict()), state=state)


def _write_small(job: _Job, small: _Small) -> list[Path]:
    """This rank's small files; returns them (with trainer_state.json on rank 0) for the checksums."""
    written = [rng.save(job.tag_dir, job.rank, small.rng), stored.loader_file(job.tag_dir, job.rank)]
    atomic_write(written[-1], small.loader)
    if small.state is not None:
        ckpt.write_state(job.tag_dir, small.state)
        written.append(job.tag_dir / stored.STATE)
    return written


def _pause_for_tests(job: _Job) -> None:
    seconds, _, at_step = os.environ.get(SAVE_PAUSE_ENV, "").partition("@")
    if seconds and int(at_step or -1) == job.step and job.rank == job.world_size - 1:
        time.sleep(float(seconds))


def _commit(job: _Job, checksums_by_rank: list[dict[str, str]], group: Any) -> None:
    """Rank 0 commits and prunes; then every rank of ``group`` (None: all) knows the save is committed."""
    if job.rank == 0:
        gb = ckpt.commit(job.tag_dir, job.marker, checksums_by_rank) / 1e9
        ckpt.prune(job.tag_dir.parent, job.keep_last)
    dist.barrier(group=group)
    if job.rank == 0:
        seconds = time.perf_counter() - job.t0
        log.info("checkpoint %s committed: %.3f GB in %.2f s (%.2f GB/s)", job.tag_dir, gb, seconds, gb / seconds)


class BackgroundSaves:
    """Checkpoint saves written, flushed and committed by a thread (see the module docstring).

    ``start`` is collective and returns once the state is in host memory; ``wait`` returns when the
    save in flight is committed (re-raising its error). The loop calls ``wait`` before the next save,
    a rollback, and the end of training, so one save is in flight at a time and none is lost.
    """

    def __init__(self) -> None:
        self._staging = HostStaging()
        self._group: Any = None
        self._thread: threading.Thread | None = None
        self._outcome: SaveDone | BaseException | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def start(self, r: Run) -> Path:
        """Collective: snapshot this step's checkpoint, then write it in the background."""
        assert self._thread is None, "wait() for the save in flight before starting another"
        if self._group is None:
            # Collective, once. The background threads' collectives must never interleave with the
            # training thread's on the default group; a group of their own keeps them apart (gloo,
            # as their payloads are host objects, also under NCCL).
            self._group = dist.new_group(backend="gloo")
        job = _begin(r)
        writes = ds.save_deferred(r.engine, job.tag_dir.parent, job.tag_dir.name, self._staging.snapshot)
        small = _capture_small(r)
        self._thread = threading.Thread(
            target=self._run, args=(job, writes, small), name=f"checkpoint-{job.tag_dir.name}", daemon=True
        )  # daemon: a failing job does not wait for a save no peer will finish
        self._thread.start()
        if job.rank == 0:
            blocked, staged = time.perf_counter() - job.t0, self._staging.nbytes / 1e9
            log.info(
                "checkpoint %s: %.3f GB snapshotted in %.2f s; writing in the background", job.tag_dir, staged, blocked
            )
        return job.tag_dir

    def wait(self) -> SaveDone | None:
        """Block until the save in flight is committed; None if there is none."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _run(self, job: _Job, writes: list[tuple[Path, Callable[[], None]]], small: _Small) -> None:
        try:
            self._outcome = _write_and_commit(job, writes, small, self._group)
        except BaseException as e:  # handed to wait(), in the training thread
            self._outcome = e


def _write_and_commit(job: _Job, writes: list[tuple[Path, Callable[[], None]]], small: _Small, group: Any) -> SaveDone:
    """The background half: write, flush, checksum; agree with every rank's thread; commit."""
    checksums: dict[str, str] = {}
    failure: BaseException | None = None
    try:
        for _, write in writes:
            write()
        written = [path for path, _ in writes] + _write_small(job, small)
        checksums = ckpt.fsync_and_checksum(job.tag_dir, written)
        _pause_for_tests(job)
    except Exception as e:  # still take part in the agreement, so no rank waits for this one
        failure = e
    gathered = ds.all_gather((checksums, None if failure is None else f"{type(failure).__name__}: {failure}"), group)
    if failure is not None:
        raise failure
    failed = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(gathered) if error]
    if failed:
        raise RuntimeError(f"checkpoint {job.tag_dir} not committed; writing failed on " + "; ".join(failed))
    _commit(job, [sums for sums, _ in gathered], group)
    return SaveDone(job.tag_dir, time.perf_counter() - job.t0)


def _marker(r: Run) -> dict:
    return {
        "step": r.state.step,
        "samples_seen": r.state.samples_seen,
        "world_size": r.env.world_size,
        "zero_stage": r.cfg.train.zero_stage,
        "precision": r.cfg.train.precision,
        "model": config_to_dict(r.cfg.model),
    }
