"""Epoch plans: which sample position each (rank, worker) slot streams, as pure arithmetic.

Positions. Epoch ``e`` lays the split's shards out in a seeded order (``shard_order``) and numbers
the samples of that concatenation 0..T-1. Counts come from the index, so no file is opened here.

Split. The ``S = world_size x workers`` slots take equal contiguous pieces of ``L = nb x B``
positions (``nb = (T // S) // B`` batches each, drop_last inside the slot), so every rank yields
exactly ``workers x nb`` batches and no position belongs to two slots. The tail of the epoch that
does not fill a whole batch in every slot (fewer than ``S x B`` samples) is dropped this epoch;
because the shard order changes every epoch, a different tail is dropped each time.

Shuffle. A slot streams its piece in blocks of ``K = shuffle_buffer`` positions and emits each
block in a seeded permutation (seed, epoch, generation, slot, block). That is a shuffle buffer of
K samples whose state is a closed form of the number of samples emitted: resuming after ``n``
emissions reloads block ``n // K`` and starts at ``n % K``, with no replay and no I/O.

Generations (resume at another size). A checkpoint records the epoch and how many batches each rank
had consumed. Resuming with the same (world size, workers, batch, K) is exact. Otherwise the
consumed positions of the interrupted split are computed (whole blocks plus the first ``n % K`` of a
permutation), the not-consumed ones form a new pool in a canonical order, and that pool is split
again over the new slots: a new *generation* of the same epoch. The pool excludes what was consumed,
so no sample repeats within the epoch; up to ``S' x B'`` samples of the pool are dropped by the new
split (on top of the usual tail), and the order differs from an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MASK = (1 << 63) - 1
_TAG_SHARDS, _TAG_BLOCK = 0x5A4D, 0xB10C


def rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (any sign)."""
    return np.random.default_rng([int(k) & _MASK for k in key])


def shard_order(num_shards: int, *, seed: int, epoch: int) -> np.ndarray:
    return rng(seed, epoch, _TAG_SHARDS).permutation(num_shards)


def block_perm(size: int, *, seed: int, epoch: int, generation: int, slot: int, block: int) -> np.ndarray:
    return rng(seed, epoch, generation, slot, block, _TAG_BLOCK).permutation(size)


class Pool:
    """An ordered multiset-free list of positions, stored as [start, end) segments.

    Sequence index i (0..len-1) is the i-th position in stream order.
    """

    def __init__(self, segments: np.ndarray) -> None:
        segs = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
        self.segs = segs[segs[:, 1] > segs[:, 0]]
        self.cum = np.concatenate([[0], np.cumsum(self.segs[:, 1] - self.segs[:, 0])]).astype(np.int64)

    @classmethod
    def range(cls, start: int, end: int) -> Pool:
        return cls(np.array([[start, end]]))

    @classmethod
    def from_positions(cls, positions: np.ndarray) -> Pool:
        """Positions in the given order, consecutive runs merged into segments."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size == 0:
            return cls(np.zeros((0, 2)))
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        starts = pos[np.concatenate([[0], breaks])]
        ends = pos[np.concatenate([breaks - 1, [pos.size - 1]])] + 1
        return cls(np.stack([starts, ends], axis=1))

    @classmethod
    def concat(cls, pools: Sequence[Pool]) -> Pool:
        if not pools:
            return cls(np.zeros((0, 2)))
        return cls(np.concatenate([p.segs for p in pools]))

    def __len__(self) -> int:
        return int(self.cum[-1])

    def slice(self, a: int, b: int) -> Pool:
        """Sequence indices [a, b) as a new pool (O(log n + segments kept))."""
        a, b = max(a, 0), min(b, len(self))
        if a >= b:
            return Pool(np.zeros((0, 2)))
        k0 = int(np.searchsorted(self.cum, a, side="right")) - 1
        k1 = int(np.searchsorted(self.cum, b, side="left"))
        segs = self.segs[k0:k1].copy()
        segs[0, 0] += a - self.cum[k0]
        segs[-1, 1] -= self.cum[k1] - b
        return Pool(segs)

    def positions(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Positions at sequence indices ``idx`` (all of them when None)."""
        if idx is None:
            idx = np.arange(len(self))
        idx = np.asarray(idx, dtype=np.int64)
        k = np.searchsorted(self.cum, idx, side="right") - 1
        return self.segs[k, 0] + idx - self.cum[k]


@dataclass(frozen=True)
class PastSplit:
    """An interrupted split of the current epoch: its geometry and the batches each rank consumed."""

    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as one slot)
    batch_size: int
    shuffle_buffer: int
    consumed: int  # batches every rank had handed out in this generation

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


def split(pool: Pool, slots: int, batch_size: int) -> tuple[list[Pool], int]:
    """Equal contiguous pieces of whole batches; returns (pieces, batches per slot)."""
    nb = len(pool) // slots // batch_size
    size = nb * batch_size
    return [pool.slice(s * size, (s + 1) * size) for s in range(slots)], nb


def consumed_by_worker(consumed: int, worker: int, workers: int) -> int:
    """Batches worker ``worker`` contributed to a rank's first ``consumed`` (round robin from worker 0)."""
    return max(0, -(-(consumed - worker) // workers))


def remaining(piece: Pool, emitted: int, *, shuffle_buffer: int, key: dict[str, int]) -> Pool:
    """Positions of ``piece`` not among its first ``emitted`` emissions, in canonical order."""
    n = len(piece)
    if emitted >= n:
        return Pool(np.zeros((0, 2)))
    q, r = divmod(emitted, shuffle_buffer)
    start = q * shuffle_buffer
    size = min(shuffle_buffer, n - start)
    left = np.sort(block_perm(size, block=q, **key)[r:]) + start
    head = Pool.from_positions(piece.positions(left))
    return Pool.concat([head, piece.slice(start + size, n)])


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    generation: int  # number of interrupted splits before this one
    order: np.ndarray  # shard indices (into the index's list) in epoch order
    starts: np.ndarray  # first position of each shard in epoch order, plus the total
    pieces: list[Pool]  # one per slot
    batches_per_slot: int

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the index's list, ordinal within that shard) of each position."""
        k = np.searchsorted(self.starts, positions, side="right") - 1
        return self.order[k], positions - self.starts[k]


def plan_epoch(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    slots: int,
    batch_size: int,
    history: Sequence[PastSplit] = (),
) -> EpochPlan:
    """The current split of epoch ``epoch`` after the interrupted splits in ``history``."""
    order = shard_order(len(counts), seed=seed, epoch=epoch)
    starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64)[order])]).astype(np.int64)
    pool = Pool.range(0, int(starts[-1]))
    for g, past in enumerate(history):
        pieces, nb = split(pool, past.slots, past.batch_size)
        assert past.consumed < past.workers * nb or nb == 0, "a finished generation is never recorded"
        rest = []
        for s, piece in enumerate(pieces):
            done = consumed_by_worker(past.consumed, s % past.workers, past.workers) * past.batch_size
            key = dict(seed=seed, epoch=epoch, generation=g, slot=s)
            rest.append(remaining(piece, done, shuffle_buffer=past.shuffle_buffer, key=key))
        pool = Pool.concat(rest)
    pieces, nb = split(pool, slots, batch_size)
    return EpochPlan(epoch, len(history), order, starts, pieces, nb)


def emission_order(piece: Pool, block: int, *, shuffle_buffer: int, key: dict[str, int]) -> np.ndarray:
    """Positions of block ``block`` of ``piece`` in the order the slot emits them."""
    start = block * shuffle_buffer
    size = min(shuffle_buffer, len(piece) - start)
    return piece.positions(start + block_perm(size, block=block, **key))
