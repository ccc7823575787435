"""The DeepSpeed config dict is derived from the typed config, never written by hand."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.train.batch import plan_batch
from pipeline.train.engine import ds_config


def derive(*overrides: str, device: str = "cpu", world: int = 2) -> dict:
    cfg = load_config(None, list(overrides))
    return ds_config(train=cfg.train, optim=cfg.optim, plan=plan_batch(cfg.train, world), device=device)


def test_batch_arithmetic_and_precision() -> None:
    d = derive("train.micro_batch_size=8", "train.global_batch_size=64", "train.precision=bf16")
    assert (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"], d["train_batch_size"]) == (8, 4, 64)
    assert d["bf16"]["enabled"] and not d["fp16"]["enabled"]
    assert d["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam on CPU
    assert d["gradient_clipping"] == 1.0


def test_zero_stage_and_offload() -> None:
    d = derive("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", device="cuda")
    zero = d["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    )
    assert "torch_adam" not in d["optimizer"]["params"]


def test_plain_stage0_fp32_clips_in_our_guard() -> None:
    assert derive("train.zero_stage=0")["gradient_clipping"] == 0.0
    assert derive("train.zero_stage=0", "train.precision=bf16")["gradient_clipping"] == 1.0


def test_universal_flag() -> None:
    cfg = load_config()
    plan = plan_batch(cfg.train, 1)
    d = ds_config(train=cfg.train, optim=cfg.optim, plan=plan, device="cpu", load_universal=True)
    assert d["checkpoint"]["load_universal"] is True
