"""Exports load in timm with timm's own loader: timm.create_model("local-dir:EXPORT", pretrained=True)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch

from pipeline.artifacts.exports import load_export
from pipeline.config import ModelConfig
from pipeline.model import ViT
from pipeline.train.export import write_export

pytestmark = pytest.mark.timeout(120)

DATA = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "eval_crop_pct": 0.9, "path": "/nonexistent"}


def _ours(**changes) -> tuple[ViT, dict]:
    arch = dict(image_size=32, patch_size=8, dim=48, depth=2, heads=3, dim_head=16, mlp_dim=96, num_classes=5,
                qkv_bias=True, layer_norm_eps=1e-6)  # fmt: skip
    cfg = asdict(ModelConfig(**{**arch, **changes}))
    torch.manual_seed(0)
    model = ViT(
        **{k: v for k, v in cfg.items() if k not in ("preset", "grad_checkpointing", "recompute", "recompute_every")}
    )
    with torch.no_grad():  # non-trivial values everywhere, LayerNorm affine included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval(), cfg


def _export(model: ViT, cfg: dict, out: Path) -> Path:
    return write_export(model.state_dict(), cfg, out, step=7, source="test", run_id=None, data=DATA)


@pytest.mark.parametrize(
    "changes", [{}, {"pool": "mean"}, {"pool": "mean", "class_token": False}, {"heads": 1, "dim_head": 48}]
)
def test_timm_loads_the_export_with_its_own_loader_and_gives_our_logits(tmp_path: Path, changes: dict) -> None:
    model, cfg = _ours(**changes)
    out = _export(model, cfg, tmp_path / "export")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (theirs(img) - model(img)).abs().max().item()
    assert diff < 1e-5, diff
    pc = theirs.pretrained_cfg
    got = [list(pc["mean"]), list(pc["std"]), pc["crop_pct"], list(pc["input_size"])]
    assert got == [[0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 0.9, [3, 32, 32]]
    assert json.loads((out / "model.json").read_text())["layout"] == "timm"
    ours_again, _ = load_export(out)  # our own layout is still what pipeline.model loads
    assert all(torch.equal(ours_again[k], v) for k, v in model.state_dict().items())


def test_export_files_are_readable_by_the_group_and_others(tmp_path: Path) -> None:
    model, cfg = _ours()
    old = os.umask(0o022)
    try:
        out = _export(model, cfg, tmp_path / "export")
    finally:
        os.umask(old)
    for f in ("model.safetensors", "model.json", "config.json"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f


def test_what_timm_cannot_express_is_said_not_guessed(tmp_path: Path) -> None:
    model, cfg = _ours(patch_norm=True)
    out = _export(model, cfg, tmp_path / "patch_norm")
    meta = json.loads((out / "model.json").read_text())
    assert not (out / "config.json").exists() and meta["layout"] == "ours"
    assert "no LayerNorm around the patch projection" in meta["timm"]
    again, _ = load_export(out)  # our layout, its marker key dropped
    assert again.keys() == model.state_dict().keys()

    model, cfg = _ours(layer_norm_eps=1e-4)  # an eps no timm variant builds
    out = _export(model, cfg, tmp_path / "eps")
    assert not (out / "config.json").exists()
    assert json.loads((out / "model.json").read_text())["timm"] == (
        "not written: timm builds LayerNorm eps 1e-06 or 1e-05, not 0.0001"
    )


def test_the_seeds_layer_norm_eps_is_carried_by_the_architecture_name(tmp_path: Path) -> None:
    model, cfg = _ours(layer_norm_eps=1e-5)
    out = _export(model, cfg, tmp_path / "export")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert {m.eps for m in theirs.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (theirs(img) - model(img)).abs().max().item()
    assert diff < 1e-5, diff


def test_timms_other_path_its_own_model_with_this_file_loads_the_right_weights(tmp_path: Path) -> None:
    # timm's model built by hand, the export's file as its pretrained weights: this used to load our
    # layout without an error and with the patch projection scrambled (logits off by ~1).
    model, cfg = _ours()
    out = _export(model, cfg, tmp_path / "export")
    args = json.loads((out / "config.json").read_text())["model_args"]
    overlay = {"file": str(out / "model.safetensors"), "num_classes": args["num_classes"]}
    theirs = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (theirs(img) - model(img)).abs().max().item() < 1e-5


def test_timm_pointed_at_a_file_in_our_layout_refuses_it(tmp_path: Path) -> None:
    model, cfg = _ours(patch_norm=True)  # a model timm cannot express keeps our layout, and a marker key
    out = _export(model, cfg, tmp_path / "export")
    args = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
        "mlp_ratio": 2.0,
        "num_classes": 5,
    }
    overlay = {"file": str(out / "model.safetensors"), "num_classes": 5}
    with pytest.raises(RuntimeError, match="this_file_is_not_timm_layout.load_the_timm_folder_of_this_export"):
        timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **args)


def test_an_mae_export_is_its_encoder_in_timms_layout(tmp_path: Path) -> None:
    from pipeline.model.mae import MaskedAutoencoder

    model, cfg = _ours()
    mae = MaskedAutoencoder(**model.init_kwargs, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    mae.load_state_dict({**mae.state_dict(), **model.state_dict()})
    out = _export(mae, cfg, tmp_path / "mae")
    meta = json.loads((out / "model.json").read_text())
    decoder = [k for k in mae.state_dict() if k.startswith("decoder.")]
    assert (
        meta["layout"] == "timm"
        and meta["left_out"] == f"{len(decoder)} decoder.* tensors (the MAE decoder; in the checkpoints)"
    )
    ours_again, _ = load_export(out)
    assert ours_again.keys() == model.state_dict().keys()
    assert all(torch.equal(ours_again[k], v) for k, v in model.state_dict().items())
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_model(x), model(x), atol=1e-5, rtol=1e-5)
