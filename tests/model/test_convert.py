"""Weight interop with the real packages: logits match after converting state dicts."""

import pytest
import torch
import vit_pytorch
from timm.models.vision_transformer import VisionTransformer

from pipeline.model import ViT
from pipeline.model.convert import (
    LayoutError,
    detect_layout,
    from_seed,
    from_timm,
    from_vit_pytorch,
    infer_vit_kwargs,
    to_ours,
    to_timm,
)
from tests.model.seed_reference import ViT as SeedViT

ARCH = dict(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96)
TIMM_ARCH = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2)


def _logits(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(img)


@pytest.fixture
def img() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 3, 32, 32)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (LayerNorm affine and biases too), so every mapping is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 48 else 0.0))
    return model


@pytest.mark.parametrize(
    ("timm_args", "our_args", "fc_norm"),
    [
        ({}, {"pool": "cls"}, False),
        ({"global_pool": "avg", "class_token": False}, {"pool": "mean", "class_token": False}, True),
        ({"global_pool": "avg", "pool_include_prefix": True}, {"pool": "mean"}, True),  # the seed's mean pool
        ({"qkv_bias": False}, {"pool": "cls", "qkv_bias": False}, False),
    ],
)
def test_timm_logits_match_both_ways(img, timm_args, our_args, fc_norm):
    torch.manual_seed(0)
    timm_model = _randomize(VisionTransformer(**TIMM_ARCH, **{"qkv_bias": True, **timm_args}))
    ours = ViT(**ARCH, dim_head=16, layer_norm_eps=1e-6, **{"qkv_bias": True, **our_args})
    ours.load_state_dict(from_timm(timm_model.state_dict()), strict=True)
    expected = _logits(timm_model, img)
    torch.testing.assert_close(_logits(ours, img), expected, atol=1e-5, rtol=0)

    _randomize(ours)  # and back: our weights into timm
    exported = to_timm(ours.state_dict(), fc_norm=fc_norm)
    timm_model.load_state_dict(exported, strict=True)
    torch.testing.assert_close(_logits(timm_model, img), _logits(ours, img), atol=1e-5, rtol=0)
    round_trip = from_timm(exported)
    assert round_trip.keys() == ours.state_dict().keys()
    assert all(torch.equal(round_trip[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize(
    ("pool", "our_args"),
    [("cls", {"patch_norm": True}), ("mean", {"patch_norm": True, "norm_before_pool": True, "class_token": False})],
)
def test_vit_pytorch_logits_match(img, pool, our_args):
    torch.manual_seed(0)
    theirs = _randomize(vit_pytorch.ViT(**ARCH, pool=pool, dim_head=16))
    ours = ViT(**ARCH, pool=pool, dim_head=16, **our_args)
    ours.load_state_dict(from_vit_pytorch(theirs.state_dict()), strict=True)
    torch.testing.assert_close(_logits(ours, img), _logits(theirs, img), atol=1e-5, rtol=0)


def test_to_timm_inserts_an_identity_projection_for_one_full_width_head(img):
    ours = _randomize(ViT(**{**ARCH, "heads": 1}, dim_head=48, qkv_bias=True, layer_norm_eps=1e-6))
    timm_model = VisionTransformer(**{**TIMM_ARCH, "num_heads": 1})
    timm_model.load_state_dict(to_timm(ours.state_dict()), strict=True)
    torch.testing.assert_close(_logits(timm_model, img), _logits(ours, img), atol=1e-5, rtol=0)


def test_detect_layout_and_to_ours():
    torch.manual_seed(0)
    seed = SeedViT(**ARCH).state_dict()
    vp = vit_pytorch.ViT(**ARCH).state_dict()
    timm_sd = VisionTransformer(**TIMM_ARCH).state_dict()
    ours = ViT(**ARCH).state_dict()
    assert [detect_layout(sd) for sd in (seed, vp, timm_sd, ours)] == ["seed", "vit_pytorch", "timm", "ours"]
    for sd, convert in ((seed, from_seed), (vp, from_vit_pytorch), (timm_sd, from_timm)):
        direct, auto = convert(sd), to_ours({f"module.{k}": v for k, v in sd.items()})
        assert direct.keys() == auto.keys() and all(torch.equal(direct[k], auto[k]) for k in direct)
    assert to_ours(ours).keys() == ours.keys()


def test_wrong_layout_lists_keys_and_names_the_layout():
    timm_sd = VisionTransformer(**TIMM_ARCH).state_dict()
    with pytest.raises(
        LayoutError, match=r"does not fit the 'seed' layout: missing keys \['to_patch_embedding.1.weight'"
    ):
        from_seed(timm_sd)
    with pytest.raises(
        LayoutError, match=r"unexpected keys \['pos_embed', 'patch_embed.proj.weight'.*look like the 'timm' layout"
    ):
        from_seed(timm_sd)
    broken = {k: v for k, v in from_timm(timm_sd).items() if k != "blocks.1.norm2.weight"}
    with pytest.raises(
        LayoutError, match=r"'ours' layout: missing keys \['blocks.1.norm2.weight'\], unexpected keys \[\]"
    ):
        to_ours(broken)
    scaled = {**timm_sd, "blocks.0.ls1.gamma": torch.ones(48)}  # layer scale: not our architecture
    with pytest.raises(
        LayoutError, match=r"'timm' layout: missing keys \[\], unexpected keys \['blocks.0.ls1.gamma'\]"
    ):
        from_timm(scaled)
    with pytest.raises(LayoutError, match=r"keys carry the prefix 'encoder.': strip it first"):
        detect_layout({f"encoder.{k}": v for k, v in timm_sd.items()})
    with pytest.raises(LayoutError, match=r"to_timm expects our layout .* got shape \(48, 3, 8, 8\)"):
        to_timm(timm_sd)
    with pytest.raises(ValueError, match="no LayerNorm around the patch projection"):
        to_timm(ViT(**ARCH, patch_norm=True).state_dict())


def test_infer_vit_kwargs_rebuilds_the_model():
    model = ViT(**ARCH, dim_head=32, qkv_bias=True, patch_norm=True)
    sd = model.state_dict()
    inferred = infer_vit_kwargs(sd)
    assert "heads" not in inferred  # 3 x 32 and 6 x 16 weigh the same
    assert inferred == dict(
        dim=48, depth=2, mlp_dim=96, num_classes=10, qkv_bias=True, patch_norm=True, class_token=True,
        patch_size=8, image_size=32,
    )  # fmt: skip
    rebuilt = ViT(**infer_vit_kwargs(sd, heads=3))
    rebuilt.load_state_dict(sd, strict=True)
    assert infer_vit_kwargs(ViT(**{**ARCH, "heads": 1}, dim_head=48).state_dict())["heads"] == 1
    with pytest.raises(ValueError, match="heads=5 does not divide the attention width 96"):
        infer_vit_kwargs(sd, heads=5)
