"""ViT: the seed's function, SDPA attention, checkpointing, drop path, head reset, resizing, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import ViT, vit_preset
from pipeline.model.convert import from_seed
from tests.model.seed_reference import ViT as SeedViT

TINY = dict(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96, dim_head=16)


def tiny(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(**{**TINY, **overrides}).eval()


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"pool": "mean"},
        {"heads": 1, "dim_head": 48},  # the seed's no-output-projection case
        {"heads": 4, "dim_head": 64},  # heads x dim_head != dim, the seed's default dim_head
        {"image_size": (32, 48), "patch_size": (8, 4)},
    ],
)
def test_seed_weights_give_the_seed_logits(args):
    torch.manual_seed(0)
    seed = SeedViT(**{**TINY, **args}).eval()
    ours = ViT(**{**TINY, **args}).eval()
    ours.load_state_dict(from_seed(seed.state_dict()), strict=True)
    img = torch.randn(3, 3, *((32, 48) if "patch_size" in args else (32, 32)))
    with torch.no_grad():
        expected, got = seed(img), ours(img)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_attention_is_sdpa_and_equals_naive_softmax_attention(monkeypatch):
    model = tiny(dropout=0.25)
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 48)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(2, 17, 3, 16).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, 48))

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), naive, atol=1e-6, rtol=0)
        model.train()
        model(torch.randn(1, 3, 32, 32))
    assert [c["dropout_p"] for c in calls] == [0.0, 0.25, 0.25]  # eval call, then one per block in training


def _grads(model: ViT, img: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)  # same dropout / drop-path draws in both runs
    F.cross_entropy(model(img), labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rates", [{}, {"dropout": 0.1, "drop_path_rate": 0.2}])
def test_grad_checkpointing_gives_the_same_gradients_and_saves_less(rates):
    model = tiny(**rates).train()
    img, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    plain = _grads(model, img, labels)
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, img, labels)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0, msg=name)

    def saved_count(enabled: bool) -> int:
        model.set_grad_checkpointing(enabled)
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            model(img)
        return count[0]

    assert saved_count(True) < saved_count(False) / 2


@pytest.mark.parametrize("rates", [{}, {"dropout": 0.1, "drop_path_rate": 0.2}])
@pytest.mark.parametrize(("mode", "every"), [("selective", 2), ("every_k", 2), ("every_k", 3)])
def test_recompute_modes_give_the_same_gradients_and_save_less(rates, mode, every):
    model = tiny(depth=4, **rates).train()
    img, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    plain = _grads(model, img, labels)
    model.set_recompute(mode, every=every)
    assert model.grad_checkpointing
    recomputed = _grads(model, img, labels)
    for name in plain:  # dropout and drop path replay their draws: torch.utils.checkpoint restores the RNG
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)

    def saved_bytes(recompute: str) -> int:
        model.set_recompute(recompute, every=every)
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(img)
        return sum(kept.values())

    none, full, this = saved_bytes("none"), saved_bytes("full"), saved_bytes(mode)
    assert full < this < none


def test_set_recompute_switches_modes_and_refuses_unknown_ones():
    model = tiny()
    model.set_recompute("selective")
    assert model.recompute == "selective" and model.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert model.recompute == "none" and not model.grad_checkpointing
    with pytest.raises(ValueError, match="use one of none, full, selective, every_k"):
        model.set_recompute("some")
    with pytest.raises(ValueError, match="every=0: must be >= 1"):
        model.set_recompute("every_k", every=0)


def test_drop_path_is_identity_in_eval_and_rises_linearly():
    model = tiny(drop_path_rate=0.3, depth=4)
    assert [round(b.drop_path.p, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3]
    plain = tiny(depth=4)
    plain.load_state_dict(model.state_dict())
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(img), plain(img), atol=0, rtol=0)

    branch = model.blocks[3].drop_path.train()
    torch.manual_seed(0)
    out = branch(torch.ones(4000, 2, 3))
    kept = out[:, 0, 0] != 0
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / 0.7]))  # kept branches scaled by 1/(1-p)
    assert abs(kept.float().mean().item() - 0.7) < 0.03
    assert (out == out[:, :1, :1]).all()  # one draw per sample


def test_reset_head_shapes_and_init():
    model = tiny()
    model.reset_head(7)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(img), torch.zeros(2, 7))  # zero init: zero logits
    model.reset_head(5, init="trunc_normal")
    w = model.head.weight
    assert w.shape == (5, 48) and model.head.bias.abs().max() == 0
    assert 0 < w.abs().max() <= 0.04 and 0.01 < w.std() < 0.03
    assert model.init_kwargs["num_classes"] == 5 and model(img).shape == (2, 5)
    model.reset_head(0)
    assert model(img).shape == (2, 48)  # features when there is no head
    with pytest.raises(ValueError, match="init='xavier' is not supported; use 'zero' or 'trunc_normal'"):
        model.reset_head(3, init="xavier")


def test_init_follows_timm():
    model = vit_preset("S/16", num_classes=100)
    fc1 = model.blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02 * 0.88) < 0.001  # 2-sigma truncation shrinks the std to 0.88
    assert fc1.weight.abs().max() <= 0.04 and fc1.bias.abs().max() == 0
    assert abs(model.pos_embed.std().item() - 0.0176) < 0.001
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(384))


def test_resize_pos_embed_same_size_is_identity():
    model = tiny()
    before = model.pos_embed.detach().clone()
    model.resize_pos_embed(32)
    assert torch.equal(model.pos_embed, before)


def test_resize_pos_embed_interpolates_the_grid_and_keeps_cls():
    model = tiny()
    with torch.no_grad():  # channel 0 = row, channel 1 = column, channel 2 = constant 3
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        model.pos_embed[0, 1:, 0], model.pos_embed[0, 1:, 1], model.pos_embed[0, 1:, 2] = (
            rows.flatten(),
            cols.flatten(),
            3,
        )
    cls = model.pos_embed[0, 0].detach().clone()
    model.resize_pos_embed((64, 48))  # grid 4x4 -> 8x6
    pos = model.pos_embed[0]
    assert pos.shape == (1 + 48, 48) and torch.equal(pos[0], cls)
    grid = pos[1:].reshape(8, 6, 48)
    torch.testing.assert_close(grid[..., 2], torch.full((8, 6), 3.0), atol=1e-5, rtol=0)
    # Bicubic reproduces a linear ramp where all 4 taps lie inside the old grid: row 3 of 8 sits at
    # (3 + 0.5) * 4 / 8 - 0.5 = 1.25 old rows; column 2 of 6 at (2 + 0.5) * 4 / 6 - 0.5.
    for i in (3, 4):
        torch.testing.assert_close(grid[i, :, 0], torch.full((6,), (i + 0.5) / 2 - 0.5), atol=1e-5, rtol=0)
    for j in (2, 3):
        torch.testing.assert_close(grid[:, j, 1], torch.full((8,), (j + 0.5) * 4 / 6 - 0.5), atol=1e-5, rtol=0)

    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.init_kwargs["image_size"] == (64, 48)
    rebuilt = ViT(**model.init_kwargs)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_layer_ids_for_layerwise_lr_decay():
    model = tiny(depth=3)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["norm.weight"] == ids["head.bias"] == 4 == model.num_blocks + 1
    assert sorted(set(ids.values())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="'blocks' is not a parameter name of ViT"):
        model.layer_id("blocks")


def test_init_kwargs_rebuild_the_architecture():
    model = tiny(pool="mean", qkv_bias=True, patch_norm=True)
    clone = ViT(**model.config)
    clone.load_state_dict(model.state_dict(), strict=True)
    assert model.config == model.init_kwargs and model.config is not model.init_kwargs


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown ViT preset 'B/15'; valid presets: Ti/16, .*B/16"):
        vit_preset("B/15")
    with pytest.raises(ValueError, match=r"image_size 30 is not divisible by patch_size 8; .*\(e.g. image_size=24\)"):
        tiny(image_size=30)
    with pytest.raises(ValueError, match="pool='max' is not supported; use pool='cls' .* or pool='mean'"):
        tiny(pool="max")
    with pytest.raises(ValueError, match="pool='cls' needs the CLS token; set class_token=True or use pool='mean'"):
        tiny(class_token=False)
    with pytest.raises(ValueError, match="dropout must be in"):
        tiny(dropout=1.0)
    with pytest.raises(
        ValueError, match=r"images are 40x32 .* built for 32x32; .* model.resize_pos_embed\(\(40, 32\)\)"
    ):
        tiny()(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny().resize_pos_embed(36)
