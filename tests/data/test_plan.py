"""The epoch arithmetic on its own: equal pieces, no position twice, re-splits that lose nothing consumed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.plan import PastSplit, Pool, consumed_by_worker, emission_order, plan_epoch

COUNTS = [50, 50, 50, 7, 50, 50, 3, 50]  # uneven shards, 310 samples


def emitted(plan, slot: int, n: int, K: int) -> np.ndarray:
    """The first n positions slot ``slot`` emits (what its batches hold)."""
    key = dict(seed=0, epoch=plan.epoch, generation=plan.generation, slot=slot)
    piece = plan.pieces[slot]
    blocks = [emission_order(piece, q, shuffle_buffer=K, key=key) for q in range(-(-len(piece) // K))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)


def consumed_positions(plan, past: PastSplit) -> list[int]:
    out = []
    for s in range(past.slots):
        done = consumed_by_worker(past.consumed, s % past.workers, past.workers) * past.batch_size
        out += emitted(plan, s, done, past.shuffle_buffer).tolist()
    return out


@pytest.mark.parametrize("ranks,workers,batch", [(2, 2, 8), (3, 2, 10), (1, 0, 7), (4, 1, 16)])
def test_split_is_equal_disjoint_and_drops_less_than_a_batch_per_slot(ranks, workers, batch):
    plan = plan_epoch(COUNTS, seed=3, epoch=1, slots=ranks * max(workers, 1), batch_size=batch)
    sizes = {len(p) for p in plan.pieces}
    assert sizes == {plan.batches_per_slot * batch}
    everything = np.concatenate([p.positions() for p in plan.pieces])
    assert len(np.unique(everything)) == len(everything)
    dropped = sum(COUNTS) - len(everything)
    assert 0 <= dropped < len(plan.pieces) * batch + len(plan.pieces)


def test_shard_order_changes_per_epoch_and_emission_is_a_permutation():
    a = plan_epoch(COUNTS, seed=0, epoch=0, slots=4, batch_size=8)
    b = plan_epoch(COUNTS, seed=0, epoch=1, slots=4, batch_size=8)
    assert not np.array_equal(a.order, b.order)
    for slot in range(4):
        got = emitted(a, slot, len(a.pieces[slot]), K=16)
        assert sorted(got.tolist()) == sorted(a.pieces[slot].positions().tolist())
        assert not np.array_equal(got, a.pieces[slot].positions())  # shuffled


@pytest.mark.parametrize(
    "old,new",
    [((2, 2, 8, 16), (3, 1, 8, 16)), ((3, 2, 4, 5), (2, 2, 6, 32)), ((2, 0, 8, 64), (4, 2, 3, 7))],
)
@pytest.mark.parametrize("consumed", [1, 5, 9])
def test_resplit_keeps_exactly_the_unconsumed_positions(old, new, consumed):
    ws, w, b, k = old
    first = plan_epoch(COUNTS, seed=0, epoch=2, slots=ws * max(w, 1), batch_size=b)
    consumed = min(consumed, first.batches_per_slot * max(w, 1) - 1)
    past = PastSplit(ws, w, b, k, consumed)
    done = consumed_positions(first, past)
    assert len(done) == len(set(done)) == consumed * b * ws
    ws2, w2, b2, _ = new
    second = plan_epoch(COUNTS, seed=0, epoch=2, slots=ws2 * max(w2, 1), batch_size=b2, history=[past])
    rest = np.concatenate([p.positions() for p in second.pieces]).tolist()
    assert not set(rest) & set(done), "a consumed sample would be seen again this epoch"
    assert len(rest) == len(set(rest))
    pool = set(np.concatenate([p.positions() for p in first.pieces]).tolist()) - set(done)
    assert set(rest) <= pool and len(pool) - len(rest) < len(second.pieces) * (b2 + 1)  # < one batch per new slot


def test_two_resplits_in_one_epoch_never_repeat_a_sample():
    p1 = PastSplit(2, 2, 8, 16, consumed=3)
    first = plan_epoch(COUNTS, seed=0, epoch=0, slots=p1.slots, batch_size=8)
    done = consumed_positions(first, p1)
    second = plan_epoch(COUNTS, seed=0, epoch=0, slots=3, batch_size=5, history=[p1])
    p2 = PastSplit(3, 1, 5, 4, consumed=2)
    done += consumed_positions(second, p2)
    third = plan_epoch(COUNTS, seed=0, epoch=0, slots=2, batch_size=8, history=[p1, p2])
    rest = np.concatenate([p.positions() for p in third.pieces]).tolist()
    assert len(done) == len(set(done)) == 3 * 8 * 2 + 2 * 5 * 3
    assert not set(rest) & set(done) and len(rest) == len(set(rest))


def test_pool_slice_and_positions_agree():
    pool = Pool(np.array([[10, 15], [40, 42], [3, 7]]))
    assert pool.positions().tolist() == [10, 11, 12, 13, 14, 40, 41, 3, 4, 5, 6]
    assert pool.slice(3, 9).positions().tolist() == [13, 14, 40, 41, 3, 4]
    assert Pool.from_positions(np.array([5, 6, 7, 1, 2, 9])).segs.tolist() == [[5, 8], [1, 3], [9, 10]]
