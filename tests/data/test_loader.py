"""The train and val loaders on real shards, with real DataLoader worker processes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from pipeline.data import DataError, PreflightError, build_loader, build_val_loader, write_synthetic
from tests.data.conftest import SIZE, data_cfg, keys_of, run_ranks, split_keys, take
from tests.fixtures.shards import SYNTHETIC

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("world,batch", [(2, 9), (3, 10)])  # 360 samples: 4 x 90 and 6 x 60, nothing dropped
def test_ranks_get_equal_batches_disjoint_samples_and_full_coverage(synthetic_shards, world, batch):
    cfg = data_cfg(synthetic_shards)
    ranks = run_ranks(cfg, world, batch)
    counts = {loader.batches_per_epoch for *_, loader in ranks}
    assert counts == {360 // (world * batch)}
    per_rank = [keys_of(batches) for batches, *_ in ranks]
    everything = [k for keys in per_rank for k in keys]
    assert len(everything) == len(set(everything)) == 360
    assert set(everything) == set(split_keys(synthetic_shards))
    for batches, state, counters, _ in ranks:
        assert state["epoch"] == 1 and state["consumed"] == 0  # exactly one epoch, on every rank
        assert counters["data/samples_read"] == len(batches) * batch
        images, labels, _ = batches[0]
        assert images.shape == (batch, 3, *SIZE) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < SYNTHETIC["classes"]


def test_uneven_shards_still_give_every_rank_the_same_batches(tmp_path):
    # 130 samples as 3 shards of 60, 60, 10: split_by_node would give one rank 2 shards and the other 1
    write_synthetic(tmp_path, n=130, classes=3, size=16, val_frac=0.0, shard_max_count=60)
    cfg = data_cfg(tmp_path, num_workers=1)
    ranks = run_ranks(cfg, world=2, batch=5, n=13)
    assert [len(batches) for batches, *_ in ranks] == [13, 13]
    assert {state["epoch"] for _, state, *_ in ranks} == {1}
    keys = [k for batches, *_ in ranks for k in keys_of(batches)]
    assert len(keys) == len(set(keys)) == 130


def test_second_epoch_has_a_new_order_and_full_coverage(synthetic_shards):
    cfg = data_cfg(synthetic_shards)
    ((batches, state, _, loader),) = run_ranks(cfg, world=1, batch=9, n=80)  # 40 per epoch
    first, second = keys_of(batches[:40]), keys_of(batches[40:])
    assert set(first) == set(second) == set(split_keys(synthetic_shards))
    assert first != second
    assert state["epoch"] == 2


@pytest.mark.parametrize("workers,after,stop", [(2, 2, 7), (2, 2, 22), (0, 1, 13), (1, 0, 10)])
def test_resume_at_the_same_size_yields_the_same_batches(synthetic_shards, workers, after, stop):
    # 0 and 1 workers both run one slot per rank: the same stream
    kw = dict(rank=1, world_size=2, batch_size=8, image_size=SIZE, seed=5, with_keys=True)
    with build_loader(data_cfg(synthetic_shards, num_workers=workers), **kw) as loader:
        straight = take(loader, 30)  # crosses the epoch boundary (22 or 21 batches per epoch)
    with build_loader(data_cfg(synthetic_shards, num_workers=workers), **kw) as loader:
        take(loader, stop)
        state = json.loads(json.dumps(loader.state_dict()))
    with build_loader(data_cfg(synthetic_shards, num_workers=after), pin_memory=True, **kw) as loader:
        loader.load_state_dict(state)
        resumed = take(loader, 30 - stop)
        assert loader.counters()["data/samples_read"] == 30 * 8
    for (x1, y1, k1), (x2, y2, k2) in zip(straight[stop:], resumed, strict=True):
        assert k1 == k2
        assert torch.equal(y1, y2) and torch.equal(x1, x2)  # the same crops and flips, too


def test_resume_is_exact_through_the_reduced_jpeg_decode(synthetic_shards):
    # 8x8 crops of the 32x32 JPEGs: every crop of 16x16 or more (area >= 25 %) is decoded at 1/2 scale
    kw = dict(rank=0, world_size=1, batch_size=8, image_size=(8, 8), seed=7, with_keys=True)
    with build_loader(data_cfg(synthetic_shards, num_workers=1), **kw) as loader:
        straight = take(loader, 8)
    with build_loader(data_cfg(synthetic_shards, num_workers=1), **kw) as loader:
        take(loader, 3)
        state = json.loads(json.dumps(loader.state_dict()))
    with build_loader(data_cfg(synthetic_shards, num_workers=0), **kw) as loader:
        loader.load_state_dict(state)
        resumed = take(loader, 5)
    for (x1, y1, k1), (x2, y2, k2) in zip(straight[3:], resumed, strict=True):
        assert k1 == k2 and torch.equal(y1, y2) and torch.equal(x1, x2)


def test_reduced_decode_can_be_switched_off(synthetic_shards):
    # 8x8 crops of 32x32 JPEGs: most are decoded at 1/2 scale, unless data.reduced_decode is false
    kw = dict(rank=0, world_size=1, batch_size=16, image_size=(8, 8), seed=7)
    out = {}
    for reduced in (True, False):
        with build_loader(data_cfg(synthetic_shards, num_workers=0, reduced_decode=reduced), **kw) as loader:
            out[reduced] = next(iter(loader))[0]
        val = build_val_loader(data_cfg(synthetic_shards, num_workers=0, reduced_decode=reduced), rank=0,
                               world_size=1, batch_size=40, image_size=(8, 8))  # fmt: skip
        out["val", reduced] = next(iter(val))[0]
    for a, b in [(out[True], out[False]), (out["val", True], out["val", False])]:
        assert 0 < (a - b).abs().mean() < 0.05  # normalised units: ~1/58 per level of 255; the bound: test_transforms


def test_resume_at_another_size_finishes_the_epoch_without_repeats(synthetic_shards):
    old = run_ranks(data_cfg(synthetic_shards, num_workers=2), world=2, batch=8, n=5)
    seen = [k for batches, *_ in old for k in keys_of(batches)]
    state = old[0][1]
    new_cfg = data_cfg(synthetic_shards, num_workers=1)
    rest, counts = [], []
    for rank in range(3):
        with build_loader(new_cfg, rank=rank, world_size=3, batch_size=6, image_size=SIZE, seed=0,
                          with_keys=True) as loader:  # fmt: skip
            loader.load_state_dict(state)
            n = 0
            while loader.epoch == 0:
                rest += next(loader)[2]
                n += 1
            counts.append(n)
            after = keys_of(take(loader, 3))
    assert len(set(counts)) == 1 and counts[0] > 0  # every new rank finishes the epoch in lockstep
    assert len(seen) == 80 and not set(seen) & set(rest) and len(rest) == len(set(rest))
    assert 360 - len(seen) - len(rest) < 3 * 6 + 3 + 8  # dropped: < one batch per new slot (+ old tail)
    # the next epoch is an ordinary one for the new geometry
    fresh = {**state, "epoch": 1, "consumed": 0, "history": [], "world_size": 3, "num_workers": 1, "batch_size": 6}
    with build_loader(new_cfg, rank=2, world_size=3, batch_size=6, image_size=SIZE, seed=0, with_keys=True) as loader:
        loader.load_state_dict(fresh)
        assert keys_of(take(loader, 3)) == after


def test_val_loader_sees_every_sample_once_with_equal_batches(synthetic_shards):
    cfg = data_cfg(synthetic_shards)
    for world in (2, 3):
        keys, lengths, pads = [], set(), 0
        for rank in range(world):
            val = build_val_loader(cfg, rank=rank, world_size=world, batch_size=8, image_size=SIZE, with_keys=True)
            batches = list(val)
            assert len(batches) == len(val)
            lengths.add(len(batches))
            for images, labels, k in batches:
                assert images.shape == (8, 3, *SIZE)
                keys += [key for key, y in zip(k, labels.tolist(), strict=True) if y >= 0]
                pads += int((labels < 0).sum())
            assert list(val) and val.counters()["data/samples_read"] == 2 * sum(int((b[1] >= 0).sum()) for b in batches)
        assert len(lengths) == 1
        assert Counter(keys) == Counter(split_keys(synthetic_shards, "val"))  # each exactly once
        assert pads == world * lengths.pop() * 8 - 40


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 deprecates it
def test_eval_images_are_deterministic_and_both_decoders_agree(synthetic_shards):
    out = {}
    for decoder in ("pil", "torchvision"):
        cfg = data_cfg(synthetic_shards, num_workers=0, decoder=decoder)
        val = build_val_loader(cfg, rank=0, world_size=1, batch_size=40, image_size=SIZE)
        (a, la), (b, lb) = next(iter(val)), next(iter(val))
        assert torch.equal(a, b) and torch.equal(la, lb)
        out[decoder] = a
    # the same crop; the two JPEG decoders may differ by rounding only
    assert (out["pil"] - out["torchvision"]).abs().mean() < 0.05


def test_bad_arguments_and_missing_data_fail_before_any_work(tmp_path, synthetic_shards):
    with pytest.raises(PreflightError, match="does not exist"):
        build_loader(data_cfg(tmp_path / "nope"), rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=0)
    with pytest.raises(PreflightError, match="less than one batch"):
        build_loader(data_cfg(synthetic_shards), rank=0, world_size=8, batch_size=32, image_size=SIZE, seed=0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        build_loader(data_cfg(synthetic_shards), rank=2, world_size=2, batch_size=8, image_size=SIZE, seed=0)
    loader = build_loader(data_cfg(synthetic_shards), rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=0)
    with pytest.raises(DataError, match="seed 0 but this run uses seed 1"):
        build_loader(data_cfg(synthetic_shards), rank=0, world_size=1, batch_size=8, image_size=SIZE,
                     seed=1).load_state_dict(loader.state_dict())  # fmt: skip
    with pytest.raises(DataError, match="not a train-loader state"):
        loader.load_state_dict({"epoch": 3})
    n = loader.batches_per_epoch
    with pytest.raises(DataError, match=f"says {n} batches consumed of an epoch of {n}"):
        loader.load_state_dict({**loader.state_dict(), "consumed": n})


def test_a_seeded_subset_of_another_split_is_read_once_across_ranks(synthetic_shards):
    cfg = data_cfg(synthetic_shards, num_workers=0)

    def keys(rank: int, world: int, seed: int) -> list[str]:
        loader = build_val_loader(cfg, rank=rank, world_size=world, batch_size=8, image_size=SIZE,
                                  with_keys=True, split="train", subset=50, seed=seed)  # fmt: skip
        return [k for _, labels, batch in loader for k, label in zip(batch, labels, strict=True) if label >= 0]

    both = keys(0, 2, seed=3) + keys(1, 2, seed=3)
    assert len(both) == len(set(both)) == 50 and set(both) <= set(split_keys(synthetic_shards, "train"))
    assert sorted(keys(0, 1, seed=3)) == sorted(both)  # the same draw whatever the world size
    assert set(keys(0, 1, seed=4)) != set(both)  # another seed, another draw


def test_batches_normalised_on_a_device_equal_the_cpu_ones(synthetic_shards):
    """``normalise_on`` (a GPU run passes "cuda"): the uint8 batch crosses first and becomes float there.
    Run here with "cpu", the same code path: the same values, contiguous float32 (B, 3, H, W)."""
    cfg = data_cfg(synthetic_shards, num_workers=0)
    kw = dict(rank=0, world_size=1, batch_size=8, image_size=SIZE, seed=3)
    with build_loader(cfg, **kw) as here, build_loader(cfg, **kw, normalise_on="cpu") as there:
        for (a, la), (b, lb) in zip(take(here, 2), take(there, 2), strict=True):
            assert b.dtype == torch.float32 and b.is_contiguous() and b.shape == (8, 3, *SIZE)
            assert torch.equal(a, b) and torch.equal(la, lb) and a.abs().sum() > 0
    val = build_val_loader(cfg, rank=0, world_size=1, batch_size=40, image_size=SIZE)
    val_there = build_val_loader(cfg, rank=0, world_size=1, batch_size=40, image_size=SIZE, normalise_on="cpu")
    assert torch.equal(next(iter(val))[0], next(iter(val_there))[0])
