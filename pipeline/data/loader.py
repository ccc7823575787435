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
  ``pin_memory=True`` and CUDA is present; with ``normalise_on`` (a GPU run) the uint8 batch is
  copied to that device first and converted there. DataLoader workers are persistent;
  ``num_workers=0`` runs the one slot of each rank in the main process.
* **GPU decode.** With ``data.decoder=nvjpeg`` the workers ship the JPEG bytes (with the crop and
  flip they drew) beside the uint8 batch, and the rank decodes, crops and normalises them on its
  GPU (:mod:`~pipeline.data.gpu_decode`); images come out on the device.
* **Val.** Every sample exactly once: rank r reads a contiguous 1/world_size of the split, in batches;
  all ranks yield the same number of batches; padding and unreadable entries have label -1.

Modules: :mod:`~pipeline.data.workers` (worker processes and their signals),
:mod:`~pipeline.data.samples` (what both streams share), :mod:`~pipeline.data.slots` (one slot's
batches of an epoch), :mod:`~pipeline.data.train_stream` (the train stream, its loader and resume
state), :mod:`~pipeline.data.val` (validation); this one builds the loaders callers use.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config.schema import DataConfig
from pipeline.data.index import DataIndex, read_index
from pipeline.data.preflight import check_geometry
from pipeline.data.samples import Look, Source
from pipeline.data.train_stream import TrainLoader, TrainStream
from pipeline.data.val import ValLoader, ValStream

log = logging.getLogger(__name__)


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
    decode_on: str | None = None,
    normalise_on: str | None = None,
) -> TrainLoader:
    """The infinite train loader of ``rank``; raises PreflightError for unusable data before any work.

    ``with_keys=True`` yields ``(images, labels, keys)`` (sample keys, for tests and debugging).
    ``data.decoder=nvjpeg`` yields images on this rank's CUDA device and is refused without one;
    ``decode_on`` names another device (tests: ``"cpu"``, the same batched decode on the CPU).
    ``normalise_on`` (a device, e.g. ``"cuda"``): the CPU decoders' uint8 batch is copied there and
    converted to normalised float32 there, and images come out on it (see :class:`Normalize`).
    """
    _check_args(rank, world_size, batch_size, image_size)
    index = read_index(cfg.path)
    info = index.split(cfg.train_split)
    check_geometry(index, info, ranks=world_size, workers=cfg.num_workers, batch_size=batch_size)
    if rank == 0:  # a stat per shard: once per job, not once per rank (100k shards on a parallel file system)
        _warn_missing(index, cfg.train_split)
    stream = TrainStream(
        source=Source.of(index, cfg.train_split),
        look=Look.of(cfg, image_size),
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    return TrainLoader(
        stream, cfg=cfg, fingerprint=index.fingerprint(cfg.train_split), pin_memory=pin_memory, with_keys=with_keys,
        decode_on=decode_on, normalise_on=normalise_on,
    )  # fmt: skip


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


def build_val_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: tuple[int, int],
    pin_memory: bool = False,
    with_keys: bool = False,
    split: str | None = None,
    subset: int = 0,
    seed: int = 0,
    decode_on: str | None = None,
    normalise_on: str | None = None,
) -> ValLoader:
    """Finite val loader; ``cfg.val_batch_size`` (when > 0) overrides ``batch_size``. ``split``: another
    split read the same way (eval transform, each sample once); ``subset`` > 0: only that many of its
    samples, a fixed draw from ``seed`` (a k-NN monitor's bank of train images, say). ``decode_on`` and
    ``normalise_on``: as :func:`build_loader`'s."""
    batch_size = cfg.val_batch_size or batch_size
    _check_args(rank, world_size, batch_size, image_size)
    split = split or cfg.val_split
    index = read_index(cfg.path)
    index.split(split)
    if rank == 0 and split == cfg.val_split:
        _warn_missing(index, cfg.val_split)
    source = Source.of(index, split)
    total = sum(source.counts)
    picked = None
    if 0 < subset < total:
        picked = np.sort(np.random.default_rng(seed).choice(total, size=subset, replace=False))
    stream = ValStream(
        source, Look.of(cfg, image_size), rank=rank, world_size=world_size, batch_size=batch_size, subset=picked
    )
    return ValLoader(
        stream, cfg=cfg, pin_memory=pin_memory, with_keys=with_keys, decode_on=decode_on, normalise_on=normalise_on
    )
