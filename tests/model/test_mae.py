"""MAE model: masking, the encoder is our ViT (names and function), patchify, the masked-only loss."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ViT
from pipeline.model.mae import MaskedAutoencoder, num_visible, random_masking, sincos_pos_embed

TINY = dict(image_size=32, patch_size=4, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96, dim_head=16)
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def tiny_mae(**overrides) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(**{**TINY, **DECODER, **overrides}).eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("ratio", "visible"), [(0.75, 16), (0.5, 32), (0.9, 6), (0.999, 1)])
def test_masking_hides_the_ratio_of_every_image(ratio: float, visible: int) -> None:
    ids_keep, ids_restore, mask = random_masking(5, 64, ratio, gen(0))
    assert num_visible(64, ratio) == visible
    assert ids_keep.shape == (5, visible) and ids_restore.shape == (5, 64) and mask.shape == (5, 64)
    assert mask.sum(dim=1).tolist() == [64 - visible] * 5
    # the kept ids are exactly the unmasked positions, and ids_restore is a permutation
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(5, visible))
    assert all(sorted(row) == list(range(64)) for row in ids_restore.tolist())
    assert len({tuple(row) for row in mask.tolist()}) == 5  # each image draws its own mask


def test_same_generator_seed_same_mask_other_seed_other_mask() -> None:
    a, b, c = (random_masking(4, 64, 0.75, gen(s))[2] for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_encoder_parameters_have_the_plain_vits_names() -> None:
    mae, vit = tiny_mae(), ViT(**TINY)
    encoder = {k: v.shape for k, v in mae.state_dict().items() if not k.startswith("decoder.")}
    assert encoder == {k: v.shape for k, v in vit.state_dict().items()}
    assert all(k.startswith("decoder.") for k in set(mae.state_dict()) - set(vit.state_dict()))
    # the fixed decoder position embedding is rebuilt, not saved
    assert "decoder.pos_embed" not in mae.state_dict()
    assert mae.init_kwargs == vit.init_kwargs  # ViT(**init_kwargs) rebuilds the encoder


def test_encoder_on_all_patches_is_the_vit() -> None:
    """With nothing masked the encoder is ViT.forward_features (then the final norm), token for token."""
    mae = tiny_mae()
    vit = ViT(**TINY).eval()
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith("decoder.")}, strict=True)
    img = torch.randn(2, 3, 32, 32)
    every = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(mae.forward_encoder(img, every), vit.norm(vit.forward_features(img)))


def test_encoder_sees_only_the_visible_tokens() -> None:
    mae = tiny_mae()
    ids_keep, _, _ = random_masking(2, 64, 0.75, gen(0))
    with torch.no_grad():
        tokens = mae.forward_encoder(torch.randn(2, 3, 32, 32), ids_keep)
    assert tokens.shape == (2, 1 + 16, 48)  # CLS + a quarter of 64 patches


def test_patchify_is_the_patch_embeddings_order_and_unpatchify_inverts_it() -> None:
    mae = tiny_mae()
    img = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(img)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    assert torch.equal(patches, mae.patch_embed.to_patches(img))
    assert torch.equal(mae.unpatchify(patches), img)


def test_norm_pix_target_is_normalised_per_patch() -> None:
    img = torch.randn(2, 3, 32, 32) * 3 + 1
    target = tiny_mae().target(img)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 64), atol=1e-4, rtol=0)
    assert torch.equal(tiny_mae(norm_pix_loss=False).target(img), tiny_mae().patchify(img))


def test_loss_is_the_mse_on_masked_patches_only() -> None:
    mae = tiny_mae()
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = mae(img, generator=gen(3))
        target = mae.target(img)
        masked = out.mask.bool()
        expected = (out.pred - target).pow(2).mean(-1)[masked].mean()
        torch.testing.assert_close(out.loss, expected)
        assert out.pred.shape == (3, 64, 48) and out.per_sample.shape == (3,)

        def loss_with(changed: torch.Tensor) -> float:
            mae.target = lambda _img: torch.where(changed.unsqueeze(-1), target + 5.0, target)
            try:
                return mae(img, generator=gen(3)).loss.item()
            finally:
                del mae.target

        assert loss_with(~masked) == out.loss.item()  # a visible patch's target is not in the loss
        assert loss_with(masked & (torch.rand(3, 64) < 0.5)) > out.loss.item() + 1.0


def test_loss_has_gradients_for_encoder_and_decoder_but_not_the_head() -> None:
    mae = tiny_mae().train()
    mae(torch.randn(2, 3, 32, 32), generator=gen(0)).loss.backward()
    grads = {n for n, p in mae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "decoder.mask_token", "decoder.pred.weight"} <= grads
    assert not any(n.startswith("head.") for n in grads)


def test_mean_pool_model_without_cls_token_works() -> None:
    mae = tiny_mae(pool="mean", class_token=False)
    out = mae(torch.randn(2, 3, 32, 32), generator=gen(0))
    assert out.pred.shape == (2, 64, 48) and torch.isfinite(out.loss)


def test_sincos_embedding_is_fixed_and_distinct_per_position() -> None:
    emb = sincos_pos_embed(32, (8, 8), prefix_tokens=1)
    assert emb.shape == (1, 65, 32)
    assert torch.equal(emb[0, 0], torch.zeros(32))
    assert len({tuple(row) for row in emb[0, 1:].tolist()}) == 64


@pytest.mark.parametrize(
    ("args", "match"),
    [({"mask_ratio": 1.0}, "mask_ratio must be in"), ({"mask_ratio": 0.0}, "mask_ratio must be in"),
     ({"decoder_dim": 30}, "decoder_dim=30 must be divisible")],
)  # fmt: skip
def test_bad_arguments_are_refused(args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_mae(**args)
