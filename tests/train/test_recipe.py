"""The recipe: a learning-rate curve over samples seen, and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest

from pipeline.config import OptimConfig
from pipeline.model import ViT
from pipeline.train.recipe import make_schedule, param_groups


def tiny(**kw) -> ViT:
    return ViT(image_size=8, patch_size=4, num_classes=3, dim=8, depth=3, heads=2, dim_head=4, mlp_dim=16, **kw)


def test_schedule_is_a_function_of_samples_not_steps() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    a = make_schedule(optim, steps=100, global_batch_size=64)  # e.g. 4 nodes
    assert (a.total_samples, a.warmup_samples) == (6400, 640)
    assert a.lr(640) == pytest.approx(1e-3)
    assert a.lr(0) == pytest.approx(1e-3 / 640)
    mid = 640 + (6400 - 640) // 2
    assert a.lr(mid) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert a.lr(6400) == pytest.approx(1e-5)
    # A resumed run at another global batch reads the same curve at the same samples seen.
    for samples in (100, 640, 3000, 6399):
        assert a.lr(samples) == make_schedule(optim, steps=100, global_batch_size=64).lr(samples)


@pytest.mark.parametrize(("kind", "half"), [("linear", 0.5 * (1e-3 + 1e-5)), ("constant", 1e-3)])
def test_other_schedules(kind: str, half: float) -> None:
    s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=0, schedule=kind), steps=10, global_batch_size=10)
    assert s.lr(50) == pytest.approx(half)


def test_no_decay_on_biases_norms_and_embeddings() -> None:
    model = tiny()
    groups = param_groups(model, weight_decay=0.05)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        decayed = by_id[id(p)]["weight_decay"] == 0.05
        expect = p.ndim > 1 and name not in ("cls_token", "pos_embed")
        assert decayed == expect, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_scales_each_block() -> None:
    model = tiny()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[2].mlp.fc1.weight)] == 0.5
    assert scale[id(model.blocks[0].attn.qkv.weight)] == 0.5**3
    assert math.isclose(scale[id(model.pos_embed)], 0.5**4)


def test_frozen_parameters_are_left_out() -> None:
    model = tiny()
    for p in model.blocks[0].parameters():
        p.requires_grad = False
    groups = param_groups(model, weight_decay=0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.blocks[0].parameters())


def test_stretch_keeps_the_lr_continuous_and_ends_the_decay_at_the_new_total() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    a = make_schedule(optim, steps=100, global_batch_size=32)  # 3200 samples, warmup 320
    at = 1600  # resumed at step 50 with train.steps 100 -> 150
    b = a.stretch(at, at + 100 * 32)
    assert (b.total_samples, b.anchor_samples) == (4800, 1600)
    assert b.anchor_progress == pytest.approx((1600 - 320) / (3200 - 320))
    assert [b.lr(s) for s in (0, 320, 1000, 1600)] == [a.lr(s) for s in (0, 320, 1000, 1600)]  # the past is kept
    assert b.lr(1632) < b.lr(1600) and b.lr(1632) > a.lr(1632)  # continuous, then a slower decay
    assert b.lr(4800) == pytest.approx(1e-5) and a.lr(3200) == pytest.approx(1e-5)
    halfway = 1600 + (4800 - 1600) / 2  # half the remaining decay is done halfway through the extension
    assert b.progress(int(halfway)) == pytest.approx(b.anchor_progress + (1 - b.anchor_progress) / 2)
    # Stretching to the same total leaves the curve as it was; a stretch inside warmup keeps the warmup.
    same = a.stretch(at, 3200)
    assert all(same.lr(s) == pytest.approx(a.lr(s), rel=1e-12) for s in range(0, 3201, 32))
    early = a.stretch(64, 6400)
    assert early.anchor_samples == 320 and early.anchor_progress == 0.0
    assert early.lr(100) == a.lr(100) and early.lr(6400) == pytest.approx(1e-5)
    assert early.lr(320 + (6400 - 320) // 2) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
