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
