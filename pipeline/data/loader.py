"""Streaming train and val loaders over tar shards: balanced, exactly resumable, tolerant of bad data.

Design (the arithmetic lives in :mod:`pipeline.data.plan`, the tar reading in :mod:`pipeline.data.tario`)

* **Slots.** Each rank runs ``W = max(num_workers, 1)`` slots (DataLoader workers); slot
  ``rank * W + w`` streams its own piece of the epoch. Pieces are equal and hold whole batches, so
  every rank yields exactly ``W x nb`` batches per epoch: no rank waits in a collective for one that
  ran dry. A piece may start or end mid-shard (the reader skips members by their tar headers).
  The tail of an epoch that does not fill one batch per slot (< slots x batch samples) is dropped;
  the shard order is re-drawn every epoch, so it is a different tail each time.
* **Order.** Batches are made inside workers; the DataLoader polls workers round-robin, so batch
  ``b`` of a rank's epoch is batch ``b // W`` of worker ``b % W``. Each batch carries its epoch and
  number; the main process checks the sequence, so a reordering could not go unnoticed.
* **Shuffle.** A slot emits its piece block by block (``data.shuffle_buffer`` samples), each block in
  a seeded permutation; samples are decoded after the buffer, and crop/flip draws are seeded by the
  batch's identity. The stream is therefore a pure function of (seed, epoch, split geometry).
* **Bad data.** A sample that cannot be used (corrupt image, missing/invalid ``cls``, truncated or
  empty shard, unreadable file) is counted by kind and its place in the batch is taken by another
  readable sample of the same batch (or, if the whole batch is unreadable, of the slot's next
  readable block). Batch shapes and counts never change, every skipped sample still counts as a
  consumed position, and the choice of stand-in depends only on file contents: resume stays exact.
  Counts travel with each batch to the main process (``counters()``), which raises
  :class:`DataError` once the skipped fraction passes ``data.max_skip_frac`` (after
  ``data.skip_check_after`` samples). Nothing sleeps.
* **Resume.** ``state_dict()`` is the position after the last batch handed out: epoch, batches
  consumed in it, and the geometry. With the same world size, workers, batch size and shuffle
  buffer the resumed loader yields exactly the batches (keys and pixels) of an uninterrupted run:
  each worker jumps to its block and offset (workers are rotated so the round robin resumes at the
  right worker). With another geometry the current epoch continues: the samples not yet consumed are
  re-split over the new slots (no duplicates, no hang; a different order, and up to
  new-slots x batch samples of the epoch's remainder are dropped). The next epoch is exact again
  for the new geometry.
* **Transfer.** Workers hand over uint8 (B, H, W, 3) batches in shared memory; the main process
  converts them to normalised float32 (B, 3, H, W), written into pinned memory when
  ``pin_memory=True`` and CUDA is present. DataLoader workers are persistent; ``num_workers=0`` runs
  the one slot of each rank in the main process.
* **Val.** Every sample exactly once: rank r reads a contiguous 1/world_size of the split, in batches;
  all ranks yield the same number of batches; padding and unreadable entries have label -1.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config.schema import DataConfig
from pipeline.data.errors import DataError, PreflightError
from pipeline.data.index import CLS_LABELS, DataIndex, LabelSpec, read_index
from pipeline.data.pixels import decode_or_skip
from pipeline.data.plan import EpochPlan, PastSplit, consumed_by_worker, emission_order, plan_epoch, rng
from pipeline.data.preflight import check_geometry
from pipeline.data.tario import SKIP_KINDS, RawSample, ReaderCache
from pipeline.data.transforms import CropDraws, Decoder, Normalize, batch_tensor, crop_resize, eval_box
from pipeline.metric_names import DATA_SAMPLES_READ, DATA_SKIPPED_PREFIX, data_skipped
from pipeline.proc import pid_alive

log = logging.getLogger(__name__)

STATE_FORMAT = 1

COUNTER_NAMES = (*(data_skipped(k) for k in SKIP_KINDS), DATA_SAMPLES_READ)
_TAG_AUG = 0xA06
Batch = tuple[torch.Tensor, torch.Tensor]


# Workers start from a forkserver, a clean single-threaded process, not by forking the training
# process: by the time a loader starts its workers, that process runs threads (the tracker, gloo,
# queue feeders), and a fork taken while one of them holds an interpreter lock deadlocks the child
# (seen here: a val worker hung in PyOS_AfterFork_Child). The server preloads torch and this module,
# so a worker starts in milliseconds.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", __name__])

# Set by the training process once it shuts its workers down; passed to every worker. Made on first
# use, so that importing this module (the forkserver preloads it) creates no semaphore.
_SHUTTING_DOWN: Any = None


# What SLURM sends every process of a job step (scancel --signal, preemption, the pre-timeout signal).
_JOB_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}


def _shutting_down() -> Any:
    """The shutdown event, made together with the forkserver, both with the job's signals blocked.

    The forkserver and multiprocessing's resource tracker are helper processes of this one, and SLURM
    signals them too. A forkserver killed by SIGTERM or USR2 takes every worker with it (a worker
    exits once its parent is gone), so the rank would crash just as it should save. A blocked
    signal mask survives fork and exec, so both helpers start with these signals held pending for
    good; this process's handlers are untouched, and a signal sent meanwhile reaches them once the
    block ends. The workers unblock them again (worker_signals).
    """
    global _SHUTTING_DOWN
    if _SHUTTING_DOWN is None:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
        try:
            event = _CONTEXT.Event()  # starts the resource tracker (the event's semaphore) ...
            signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)  # ... whose start unblocks SIGTERM
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _SHUTTING_DOWN = event
    return _SHUTTING_DOWN


def _on_worker_sigterm(shutting_down: Any) -> Any:
    def handler(signum: int, frame: object) -> None:
        if shutting_down.is_set():
            os._exit(0)  # the training process is stopping its workers (DataLoader shutdown, exit)

    return handler


def worker_signals(worker_id: int, shutting_down: Any, trainer_pid: int | None = None) -> None:
    """DataLoader workers survive the job's signals; only their own training process ends them.

    SLURM signals every process of a job step. A worker that died on SLURM's SIGTERM (which
    submitit ignores in the main process) would crash the rank before it could save on the USR2
    that follows; one that inherited the requeue handler could requeue the job itself. So workers
    ignore USR2, and exit on SIGTERM only once their training process has begun shutting them down,
    or once that process is gone (``trainer_pid``: see _exit_with).
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_worker_sigterm(shutting_down))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)  # inherited blocked from the forkserver
    if trainer_pid is not None:
        threading.Thread(target=_exit_with, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this worker as soon as process ``pid`` (its training process) has ended, however it ended.

    torch's own check compares the worker's parent with the one it started under, and a worker's
    parent is the forkserver, not the training process. A SIGKILLed rank (torchrun stopping a
    failed job, the OOM killer) therefore left its workers running, and they in turn kept the
    forkserver and the resource tracker alive (each holds the pipes whose closing ends those two):
    three orphans per rank, holding the job's stdout open so that whoever waits for its end waits
    forever. A pidfd becomes readable when its process exits, without polling.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)  # gone before this worker started
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        while pid_alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def _data_loader(stream: IterableDataset, workers: int, prefetch_factor: int) -> DataLoader:
    """The DataLoader both loaders run: batches come made from the stream, workers stay for the run."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {
            "multiprocessing_context": _CONTEXT,
            "worker_init_fn": functools.partial(
                worker_signals, shutting_down=_shutting_down(), trainer_pid=os.getpid()
            ),
            "persistent_workers": True,  # evaluation runs many times: keep its workers
            "prefetch_factor": prefetch_factor,
        }
    return DataLoader(
        stream,
        batch_size=None,  # batches are made inside the workers
        num_workers=workers,
        pin_memory=False,  # the float32 images are written into pinned memory by Normalize
        **options,
    )


@atexit.register
def _release_workers() -> None:
    # Runs before multiprocessing's exit hook (atexit is last-in, first-out), which SIGTERMs and
    # joins the remaining workers: they must take that SIGTERM.
    if _SHUTTING_DOWN is not None:
        _SHUTTING_DOWN.set()


@dataclass(frozen=True)
class _Source:
    """A split's shards, as plain data a worker process can receive."""

    root: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    label: LabelSpec = CLS_LABELS
    classes: tuple[str, ...] = ()  # json labels may name their class
    index: str = ""  # the index file, for messages

    @classmethod
    def of(cls, index: DataIndex, split: str) -> _Source:
        info = index.split(split)
        if index.label.kind == "none":
            # Batches carry labels, and -1 marks an unreadable entry; unlabeled data needs an objective
            # that reads no labels (e.g. MAE), which this loader does not serve yet.
            raise PreflightError(
                f"{index.path} is indexed without labels (--unlabeled); the train/val loaders feed a classification "
                f"objective, which needs one: re-index with `cls` members or `--label json:FIELD`"
            )
        return cls(
            str(index.root),
            tuple(s.name for s in info.shards),
            tuple(s.samples for s in info.shards),
            index.num_classes,
            index.label,
            index.classes if index.label.kind == "json" else (),
            str(index.path),
        )

    def readers(self) -> ReaderCache:
        counts = dict(zip(self.names, self.counts, strict=True))
        return ReaderCache(Path(self.root), counts, self.num_classes, label=self.label, classes=self.classes)


@dataclass(frozen=True)
class _Look:
    """How samples become pixels: size (H, W), normalisation, decoder, and the train augmentation."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    decoder: Decoder
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    eval_crop_pct: float

    @classmethod
    def of(cls, cfg: DataConfig, image_size: tuple[int, int]) -> _Look:
        fields = ("mean", "std", "decoder", "crop_scale", "crop_ratio", "hflip", "eval_crop_pct")
        return cls(image_size=tuple(image_size), **{f: getattr(cfg, f) for f in fields})


@dataclass(frozen=True)
class Position:
    """Where a rank's stream stands: epoch, batches handed out in it, and its interrupted splits."""

    epoch: int = 0
    consumed: int = 0
    history: tuple[PastSplit, ...] = ()


class _Tally:
    """Per-slot counts of samples read and skipped (by kind and by shard), sent along with each batch."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTER_NAMES, 0)
        self.bad_shards: Counter[str] = Counter()

    def skip(self, kind: str, shard: str) -> None:
        self.counts[data_skipped(kind)] += 1
        self.bad_shards[shard] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "bad_shards": dict(self.bad_shards.most_common(20))}


def _read_positions(locate, positions: np.ndarray, source: _Source, readers: ReaderCache) -> list[RawSample]:
    """Samples at ``positions`` (any order), each shard read once in increasing ordinal order."""
    shard_idx, ordinal = locate(positions)
    out: list[RawSample] = [None] * len(positions)  # type: ignore[list-item]
    by_pos = np.argsort(positions, kind="stable")
    groups = np.split(by_pos, np.flatnonzero(np.diff(shard_idx[by_pos]) != 0) + 1) if len(by_pos) else []
    for group in groups:
        name = source.names[int(shard_idx[group[0]])]
        for i, sample in zip(group, readers.get(name).read([int(o) for o in ordinal[group]]), strict=True):
            out[int(i)] = sample
    return out


class _SlotEpoch:
    """The batches of one slot in one epoch: blocks read, permuted, decoded, bad entries replaced."""

    def __init__(self, stream: TrainStream, plan: EpochPlan, slot: int, readers: ReaderCache, tally: _Tally) -> None:
        self.s, self.plan, self.slot, self.readers, self.tally = stream, plan, slot, readers, tally
        self.piece = plan.pieces[slot]
        self.key = dict(seed=stream.seed, epoch=plan.epoch, generation=plan.generation, slot=slot)
        self.blocks: dict[int, list[RawSample]] = {}

    def _block(self, q: int) -> list[RawSample]:
        if q not in self.blocks:
            positions = emission_order(self.piece, q, shuffle_buffer=self.s.shuffle_buffer, key=self.key)
            self.blocks[q] = _read_positions(self.plan.locate, positions, self.s.source, self.readers)
        return self.blocks[q]

    def batches(self, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[str]]]:
        B, K = self.s.batch_size, self.s.shuffle_buffer
        for j in range(start, self.plan.batches_per_slot):
            e0, e1 = j * B, (j + 1) * B
            entries: list[RawSample] = []
            for q in range(e0 // K, (e1 - 1) // K + 1):
                lo, hi = max(e0, q * K) - q * K, min(e1, (q + 1) * K) - q * K
                entries.extend(self._block(q)[lo:hi])
            for q in [q for q in self.blocks if q < (e1 - 1) // K]:
                del self.blocks[q]  # the buffer holds at most the blocks of the current batch
            yield (j, *self._assemble(entries, j))

    def _assemble(self, entries: list[RawSample], j: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        look, B = self.s.look, len(entries)
        draws = CropDraws.draw(
            rng(*self.key.values(), j, _TAG_AUG), B, scale=look.crop_scale, ratio=look.crop_ratio, hflip=look.hflip
        )
        batch = batch_tensor((B, *look.image_size, 3), torch.uint8)  # (B, H, W, 3), shared memory in a worker
        u8 = batch.numpy()
        labels = torch.full((B,), -1, dtype=torch.int64)
        keys = [s.key for s in entries]
        self.tally.counts[DATA_SAMPLES_READ] += B
        for i, sample in enumerate(entries):
            pixels, kind = self._decode(sample, i, draws)
            if kind is None:
                u8[i], labels[i] = pixels, sample.label
            else:
                self.tally.skip(kind, sample.shard)
        good = (labels >= 0).nonzero().flatten().tolist()
        if not good:
            good = self._rescue(u8, labels, keys, draws, j)
        for i in range(B):
            if labels[i] < 0:  # stand-in: the next readable entry of the batch, cyclically
                src = next((g for g in good if g > i), good[0])
                u8[i], labels[i], keys[i] = u8[src], labels[src], keys[src]
        return batch, labels, keys

    def _decode(self, sample: RawSample, i: int, draws: CropDraws) -> tuple[np.ndarray | None, str | None]:
        """``sample`` rendered as entry i of the batch (its crop and flip draws), or why it is skipped."""
        look = self.s.look

        def render(data: bytes) -> np.ndarray:
            box = functools.partial(draws.box, i, ratio=look.crop_ratio)
            return crop_resize(data, box, look.image_size, bool(draws.flip[i]), look.decoder)

        return decode_or_skip(sample, render)

    def _rescue(self, u8: np.ndarray, labels: torch.Tensor, keys: list[str], draws: CropDraws, j: int) -> list[int]:
        """No entry of batch j was readable: borrow readable samples from the slot's next blocks."""
        B, K = self.s.batch_size, self.s.shuffle_buffer
        nblocks = -(-len(self.piece) // K)
        first = ((j + 1) * B - 1) // K + 1
        filled: list[int] = []
        for step in range(nblocks):
            q = (first + step) % nblocks
            block = self._block(q)
            for sample in block:
                pixels, kind = self._decode(sample, len(filled), draws)
                if kind is None:  # a bad one is counted when its own batch comes
                    u8[len(filled)], labels[len(filled)], keys[len(filled)] = pixels, sample.label, sample.key
                    filled.append(len(filled))
                    if len(filled) == B:
                        break
            if q not in range(j * B // K, first):
                del self.blocks[q]
            if filled:
                return filled
        raise DataError(
            f"data: worker slot {self.slot} of epoch {self.plan.epoch} has no readable sample in its "
            f"{len(self.piece)} samples (shards {', '.join(sorted(self.tally.bad_shards)[:5])}); "
            f"check the data with `python -m pipeline.data.shards check {self.s.source.index} --decode`"
        )


@dataclass
class TrainStream(IterableDataset):
    """The infinite batch stream of one rank; each DataLoader worker plays one slot."""

    source: _Source
    look: _Look
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    seed: int
    shuffle_buffer: int
    start: Position = Position()

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    def plan(self, epoch: int, history: tuple[PastSplit, ...] = ()) -> EpochPlan:
        return plan_epoch(
            self.source.counts,
            seed=self.seed,
            epoch=epoch,
            slots=self.world_size * self.workers,
            batch_size=self.batch_size,
            history=history,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]]:
        info = get_worker_info()
        # Rotate so the DataLoader's first poll (worker 0) lands on the slot that owns the next batch.
        w = ((info.id if info else 0) + self.start.consumed) % self.workers
        slot = self.rank * self.workers + w
        readers, tally = self.source.readers(), _Tally()
        epoch, history, consumed = self.start.epoch, self.start.history, self.start.consumed
        try:
            while True:
                plan = self.plan(epoch, history)
                total = plan.batches_per_slot * self.workers
                assert total > 0 or history, "build_loader's geometry check guarantees batches in a fresh epoch"
                done = consumed_by_worker(consumed, w, self.workers)
                for j, u8, labels, keys in _SlotEpoch(self, plan, slot, readers, tally).batches(done):
                    meta = {"epoch": epoch, "batch": j * self.workers + w, "batches": total, "worker": w}
                    yield u8, labels, keys, {**meta, **tally.snapshot()}
                epoch, history, consumed = epoch + 1, (), 0
        finally:
            readers.close()


class TrainLoader:
    """Infinite iterator of (images, labels) for one rank; see the module docstring for the design."""

    def __init__(
        self,
        stream: TrainStream,
        *,
        cfg: DataConfig,
        fingerprint: str,
        pin_memory: bool = False,
        with_keys: bool = False,
    ) -> None:
        self._stream, self._cfg, self._fingerprint = stream, cfg, fingerprint
        self._norm, self._with_keys = Normalize(cfg.mean, cfg.std, pin=pin_memory), with_keys
        self._pos = Position()
        self._base = dict.fromkeys(COUNTER_NAMES, 0)  # counts restored from a checkpoint
        self._live: dict[int, dict[str, Any]] = {}  # latest tally of each worker slot
        self._dl: DataLoader | None = None
        self._it: Iterator | None = None
        self.batches_per_epoch = stream.plan(0).batches_per_slot * stream.workers

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._pos.epoch

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch handed out (including those before a resume)."""
        return self._pos.consumed

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch | tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self._it is None:
            self._start()
        u8, labels, keys, meta = next(self._it)  # type: ignore[arg-type]
        self._advance(meta)
        self._check_skips()
        images = self._norm(u8)  # (B, 3, H, W) float32
        labels = labels.pin_memory() if self._norm.pin else labels
        return (images, labels, keys) if self._with_keys else (images, labels)

    def _start(self) -> None:
        stream = replace(self._stream, start=self._pos)
        workers = self._cfg.num_workers
        self._dl = _data_loader(stream, workers, self._cfg.prefetch_factor)
        self._it = iter(self._dl)
        self._base, self._live = self.counters(), {}

    def _advance(self, meta: dict[str, Any]) -> None:
        pos = self._pos
        expected = pos.consumed if meta["epoch"] == pos.epoch else 0
        assert meta["epoch"] in (pos.epoch, pos.epoch + 1) and meta["batch"] == expected, (
            f"data stream out of order: got epoch {meta['epoch']} batch {meta['batch']}, expected "
            f"epoch {pos.epoch} batch {pos.consumed}"
        )
        history = pos.history if meta["epoch"] == pos.epoch else ()
        if meta["batch"] + 1 == meta["batches"]:
            self._pos = Position(meta["epoch"] + 1, 0, ())
        else:
            self._pos = Position(meta["epoch"], meta["batch"] + 1, history)
        self._live[meta["worker"]] = meta

    def counters(self) -> dict[str, int]:
        """This rank's cumulative sample counts (read, and skipped by kind), for the tracker."""
        out = dict(self._base)
        for meta in self._live.values():
            for k, v in meta["counts"].items():
                out[k] += v
        return out

    def _check_skips(self) -> None:
        c = self.counters()
        read = c[DATA_SAMPLES_READ]
        skipped = sum(v for k, v in c.items() if k != DATA_SAMPLES_READ)
        cfg = self._cfg
        if read < cfg.skip_check_after or skipped <= cfg.max_skip_frac * read:
            return
        kinds = ", ".join(
            f"{k.removeprefix(DATA_SKIPPED_PREFIX)}={v}" for k, v in c.items() if v and k != DATA_SAMPLES_READ
        )
        shards: Counter[str] = Counter()
        for meta in self._live.values():
            shards.update(meta["bad_shards"])
        worst = ", ".join(f"{name} ({n})" for name, n in shards.most_common(5))
        raise DataError(
            f"data: {skipped} of {read} samples read on rank {self._stream.rank} were skipped "
            f"({skipped / read:.2%}), above data.max_skip_frac={cfg.max_skip_frac} (judged after "
            f"data.skip_check_after={cfg.skip_check_after} samples): {kinds}; worst shards: {worst or 'n/a'}. "
            f"Find the damage with `python -m pipeline.data.shards check {cfg.path} --decode`, re-write those "
            f"shards, or raise data.max_skip_frac"
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out (plus this rank's counters)."""
        s = self._stream
        return {
            "format": STATE_FORMAT,
            "kind": "train",
            "epoch": self._pos.epoch,
            "consumed": self._pos.consumed,
            "history": [asdict(p) for p in self._pos.history],
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "batch_size": s.batch_size,
            "shuffle_buffer": s.shuffle_buffer,
            "seed": s.seed,
            "fingerprint": self._fingerprint,
            "rank": s.rank,
            "counters": self.counters(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``sd``: exactly when the geometry matches, else by re-splitting the epoch's rest."""
        s = self._stream
        _check_state(sd, self._fingerprint, s.seed)
        history = tuple(PastSplit(**p) for p in sd["history"])
        old = PastSplit(sd["world_size"], sd["num_workers"], sd["batch_size"], sd["shuffle_buffer"], sd["consumed"])
        old_stream = replace(s, world_size=old.world_size, num_workers=old.num_workers, batch_size=old.batch_size)
        total = old_stream.plan(sd["epoch"], history).batches_per_slot * old.workers
        if not 0 <= old.consumed < max(total, 1):
            raise DataError(f"data: loader state says {old.consumed} batches consumed of an epoch of {total}")
        here = PastSplit(s.world_size, s.num_workers, s.batch_size, s.shuffle_buffer, 0)
        if _geometry(old) == _geometry(here) or (old.consumed == 0 and not history):
            self._pos = Position(sd["epoch"], sd["consumed"], history)  # exact
        else:
            log.info(
                "data: resuming epoch %d with another geometry (%s -> %s): re-splitting the samples not yet consumed",
                sd["epoch"], old, here,
            )  # fmt: skip
            self._pos = Position(sd["epoch"], 0, (*history, old))
        keep = sd["rank"] == s.rank and sd["world_size"] == s.world_size
        self._base = {k: int(sd["counters"].get(k, 0)) if keep else 0 for k in COUNTER_NAMES}
        self._live = {}
        self._shutdown()

    def _shutdown(self) -> None:
        it, self._it, self._dl = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            _shutting_down().set()  # torch may SIGTERM a worker that does not stop in time
            it._shutdown_workers()
            _shutting_down().clear()

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage collected)."""
        self._base, self._live = self.counters(), {}
        self._shutdown()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _geometry(p: PastSplit) -> tuple[int, int, int, int]:
    """What fixes a rank's stream besides seed and epoch (0 and 1 workers both mean one slot per rank)."""
    return p.world_size, p.workers, p.batch_size, p.shuffle_buffer


def _check_state(sd: dict[str, Any], fingerprint: str, seed: int) -> None:
    need = (
        "format",
        "kind",
        "epoch",
        "consumed",
        "history",
        "world_size",
        "num_workers",
        "batch_size",
        "shuffle_buffer",
        "seed",
        "fingerprint",
        "rank",
        "counters",
    )
    missing = [k for k in need if k not in sd]
    if missing or sd.get("kind") != "train" or sd.get("format") != STATE_FORMAT:
        raise DataError(
            f"data: not a train-loader state (missing {missing or 'nothing'}, kind={sd.get('kind')!r}, "
            f"format={sd.get('format')!r}); pass the dict saved from TrainLoader.state_dict()"
        )
    if sd["fingerprint"] != fingerprint:
        raise DataError(
            f"data: the loader state was saved for another shard layout (fingerprint {sd['fingerprint']} != "
            f"{fingerprint}): its positions would name other samples. Resume with the same data.path and shards, "
            f"or start a new run"
        )
    if sd["seed"] != seed:
        raise DataError(
            f"data: the loader state was saved with seed {sd['seed']} but this run uses seed {seed}; resume with "
            f"train.seed={sd['seed']} (the epoch's order depends on it)"
        )


def build_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: tuple[int, int],
    seed: int,
    pin_memory: bool = False,
    with_keys: bool = False,
) -> TrainLoader:
    """The infinite train loader of ``rank``; raises PreflightError for unusable data before any work.

    ``with_keys=True`` yields ``(images, labels, keys)`` (sample keys, for tests and debugging).
    """
    _check_args(rank, world_size, batch_size, image_size)
    index = read_index(cfg.path)
    info = index.split(cfg.train_split)
    check_geometry(index, info, ranks=world_size, workers=cfg.num_workers, batch_size=batch_size)
    if rank == 0:  # a stat per shard: once per job, not once per rank (100k shards on a parallel file system)
        _warn_missing(index, cfg.train_split)
    stream = TrainStream(
        source=_Source.of(index, cfg.train_split),
        look=_Look.of(cfg, image_size),
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    return TrainLoader(
        stream, cfg=cfg, fingerprint=index.fingerprint(cfg.train_split), pin_memory=pin_memory, with_keys=with_keys
    )


def _check_args(rank: int, world_size: int, batch_size: int, image_size: tuple[int, int]) -> None:
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(tuple(image_size)) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width) > 0, got {image_size!r}")


def _warn_missing(index: DataIndex, split: str) -> None:
    """Missing or resized shards are skipped (and counted) at run time; say so now, once."""
    bad = []
    for shard in index.split(split).shards:
        path = index.shard_path(shard)
        size = path.stat().st_size if path.is_file() else -1
        if size != shard.bytes:
            bad.append(f"{shard.name} ({'missing' if size < 0 else f'{size} bytes, index says {shard.bytes}'})")
    if bad:
        log.warning(
            "data: %d shard(s) of split %r do not match the index and will be skipped where unreadable: %s",
            len(bad),
            split,
            ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
        )


# ------------------------------------------------------------------------------------------ val


class ValStream(IterableDataset):
    """A rank's val batches; worker w makes batches w, w + W, ... (the DataLoader interleaves them)."""

    def __init__(self, source: _Source, look: _Look, *, rank: int, world_size: int, batch_size: int) -> None:
        super().__init__()
        self.source, self.look, self.rank, self.world_size, self.batch_size = source, look, rank, world_size, batch_size
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(source.counts, dtype=np.int64))])
        self.total = int(self.starts[-1])
        # This rank's positions: a contiguous 1/world_size of the split (sizes differ by at most 1).
        self.bounds = rank * self.total // world_size, (rank + 1) * self.total // world_size

    def __len__(self) -> int:
        return max(1, math.ceil(math.ceil(self.total / self.world_size) / self.batch_size))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.searchsorted(self.starts, positions, side="right") - 1
        return k, positions - self.starts[k]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        readers, tally = self.source.readers(), _Tally()
        lo, hi = self.bounds
        try:
            for b in range(wid, len(self), workers):
                positions = np.arange(lo + b * self.batch_size, min(lo + (b + 1) * self.batch_size, hi))
                samples = _read_positions(self.locate, positions, self.source, readers)
                u8, labels, keys = self._assemble(samples, tally)
                yield u8, labels, keys, {"worker": wid, "batch": b, **tally.snapshot()}
        finally:
            readers.close()

    def _assemble(self, samples: list[RawSample], tally: _Tally) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        look, B = self.look, self.batch_size
        batch = batch_tensor((B, *look.image_size, 3), torch.uint8)  # (B, H, W, 3), shared memory in a worker
        u8 = batch.numpy()
        labels = torch.full((B,), -1, dtype=torch.int64)
        keys = [""] * B
        tally.counts[DATA_SAMPLES_READ] += len(samples)
        u8[len(samples) :] = 0  # padding
        box = functools.partial(eval_box, size=look.image_size, crop_pct=look.eval_crop_pct)
        render = functools.partial(crop_resize, box_fn=box, size=look.image_size, flip=False, decoder=look.decoder)
        for i, s in enumerate(samples):
            keys[i] = s.key
            pixels, kind = decode_or_skip(s, render)
            if kind is None:
                u8[i], labels[i] = pixels, s.label
            else:
                tally.skip(kind, s.shard)
                u8[i] = 0
        return batch, labels, keys


class ValLoader:
    """Finite, re-iterable: each pass yields every val sample once across ranks, same batch count per rank."""

    def __init__(self, stream: ValStream, *, cfg: DataConfig, pin_memory: bool = False, with_keys: bool = False):
        self._stream, self._cfg, self._with_keys = stream, cfg, with_keys
        self._norm = Normalize(cfg.mean, cfg.std, pin=pin_memory)
        workers = min(cfg.num_workers, len(stream))
        self._dl = _data_loader(stream, workers, cfg.prefetch_factor)
        self._counts = dict.fromkeys(COUNTER_NAMES, 0)

    def __len__(self) -> int:
        return len(self._stream)

    def __iter__(self) -> Iterator[Batch | tuple[torch.Tensor, torch.Tensor, list[str]]]:
        before, live = dict(self._counts), {}
        for u8, labels, keys, meta in self._dl:
            live[meta["worker"]] = meta["counts"]
            self._counts = {k: before[k] + sum(c[k] for c in live.values()) for k in COUNTER_NAMES}
            images, labels = self._norm(u8), labels.pin_memory() if self._norm.pin else labels
            yield (images, labels, keys) if self._with_keys else (images, labels)

    def counters(self) -> dict[str, int]:
        """Cumulative over all passes: samples read and skipped by kind (skipped ones have label -1)."""
        return dict(self._counts)

    def close(self) -> None:
        self._dl = None  # type: ignore[assignment]


def build_val_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: tuple[int, int],
    pin_memory: bool = False,
    with_keys: bool = False,
) -> ValLoader:
    """Finite val loader; ``cfg.val_batch_size`` (when > 0) overrides ``batch_size``."""
    batch_size = cfg.val_batch_size or batch_size
    _check_args(rank, world_size, batch_size, image_size)
    index = read_index(cfg.path)
    index.split(cfg.val_split)
    if rank == 0:
        _warn_missing(index, cfg.val_split)
    stream = ValStream(
        _Source.of(index, cfg.val_split),
        _Look.of(cfg, image_size),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
    )
    return ValLoader(stream, cfg=cfg, pin_memory=pin_memory, with_keys=with_keys)
