"""Presets: published sizes, parameter counts equal to timm's equivalents (no weights downloaded)."""

import subprocess
import sys

import pytest
import timm
import torch

from pipeline.model import PRESET_NAMES, vit_preset


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("preset", "timm_name"),
    [("Ti/16", "vit_tiny_patch16_224"), ("S/16", "vit_small_patch16_224")],
)
def test_parameter_count_equals_timm(preset, timm_name):
    ours = vit_preset(preset)
    theirs = timm.create_model(timm_name, pretrained=False)
    assert _count(ours) == _count(theirs)
    if preset == "Ti/16":
        with torch.no_grad():
            assert ours(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("preset", "timm_name", "expected"),
    [
        ("B/16", "vit_base_patch16_224", 86_567_656),
        ("L/16", "vit_large_patch16_224", 304_326_632),
        ("H/14", "vit_huge_patch14_224", 632_045_800),
    ],
)
def test_large_parameter_counts_on_the_meta_device(preset, timm_name, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = vit_preset(preset)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert _count(ours) == _count(theirs) == expected


def test_every_preset_is_buildable_and_overridable():
    with torch.device("meta"):
        models = {name: vit_preset(name, num_classes=10, image_size=112) for name in PRESET_NAMES}
    assert models["B/14"].grid_size == (8, 8) and models["B/16"].grid_size == (7, 7)
    assert models["S/16"].init_kwargs["dim"] == 384 and models["L/14"].num_blocks == 24
    assert all(m.head.out_features == 10 for m in models.values())


def test_presets_and_flops_import_without_torch():
    # the config loader expands presets before anything heavy is imported
    code = "import sys, pipeline.model.presets, pipeline.model.flops; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
