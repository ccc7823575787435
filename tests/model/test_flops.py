"""forward_macs: the published ViT-B/16 figure, and an exact match with torch's flop counter."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import ViT, forward_macs, vit_preset


def test_vit_b16_at_224_is_17_58_gmacs():
    with torch.device("meta"):
        model = vit_preset("B/16")
    assert abs(forward_macs(model) / 17.58e9 - 1) < 0.01


def test_matches_torch_flop_counter_on_a_tiny_model():
    for args in ({}, {"heads": 1, "dim_head": 48}, {"image_size": (32, 48), "class_token": False, "pool": "mean"}):
        model = ViT(
            **{"image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 48, "depth": 2, "heads": 3, "mlp_dim": 96,
               "dim_head": 16, **args}
        ).eval()  # fmt: skip
        size = model.image_size
        counter = FlopCounterMode(display=False)
        # the math backend runs attention as matmuls, which the counter sees
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(torch.randn(2, 3, *size))
        assert counter.get_total_flops() == 2 * 2 * forward_macs(model), args  # 2 flops per MAC, 2 images


def test_mae_counts_the_encoder_on_visible_patches_plus_the_decoder():
    from pipeline.model.mae import MaskedAutoencoder

    model = MaskedAutoencoder(
        image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96, dim_head=16,
        mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=4,
    ).eval()  # fmt: skip
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    # the loss's elementwise ops are not matmuls: the counter sees exactly the formula's products
    assert counter.get_total_flops() == 2 * 2 * forward_macs(model)
    # 16 patches, 4 visible (+ CLS): encoder blocks 5 tokens; decoder blocks 17 tokens of width 32.
    block = 5 * 48 * 144 + 2 * 3 * 25 * 16 + 5 * 48 * 48 + 2 * 5 * 48 * 96
    dec_block = 17 * 32 * 96 + 2 * 4 * 17 * 17 * 8 + 17 * 32 * 32 + 2 * 17 * 32 * 128
    assert forward_macs(model) == 16 * 192 * 48 + 2 * block + 5 * 48 * 32 + dec_block + 17 * 32 * 192


def test_mae_vit_b16_encoder_costs_about_a_quarter_of_the_classifier():
    from pipeline.model.flops import mae_forward_macs, vit_forward_macs

    b16 = dict(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072)
    mae = mae_forward_macs(**b16, mask_ratio=0.75, decoder_dim=512, decoder_depth=1, decoder_heads=16)
    light = mae_forward_macs(**b16, mask_ratio=0.75, decoder_dim=512, decoder_depth=0, decoder_heads=16)
    assert 0.24 < light / vit_forward_macs(**b16) < 0.26  # 50 of 197 tokens through the encoder
    assert mae > light
