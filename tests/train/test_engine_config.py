"""The DeepSpeed config dict is derived from the typed config, never written by hand; the AdamW choice."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.config import load_config
from pipeline.train.batch import plan_batch
from pipeline.train.engine import adamw_impl, ds_config, keep_adamw_impl


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


def test_adamw_choice_per_device() -> None:
    assert adamw_impl("cpu", offload_optimizer=False) == "torch"  # the CPU path as before
    assert adamw_impl("cuda", offload_optimizer=False) == "torch_fused"
    assert adamw_impl("cuda", offload_optimizer=True) == adamw_impl("cpu", offload_optimizer=True) == "deepspeed_cpu"
    cpu = derive()["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    gpu = derive(device="cuda")["optimizer"]["params"]
    assert gpu["torch_adam"] is True and gpu["fused"] is True  # DeepSpeed passes it to torch.optim.AdamW


def _adamw(fused: bool | None) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.05}], lr=1e-2, fused=fused), params


def _steps(opt: torch.optim.AdamW, params: list[torch.nn.Parameter], n: int) -> None:
    for i in range(n):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (i + 1)) + p.detach()
        opt.step()


def test_checkpoints_load_across_the_adamw_choice() -> None:
    """torch's fused AdamW (the GPU choice; torch also has it on CPU) and the CPU path write the same state
    layout, and each run keeps its own implementation after loading the other's checkpoint."""
    fused, fused_params = _adamw(True)
    plain, plain_params = _adamw(None)
    _steps(fused, fused_params, 3)
    _steps(plain, plain_params, 3)
    a, b = fused.state_dict(), plain.state_dict()
    assert {k: sorted(v) for k, v in a["state"].items()} == {k: sorted(v) for k, v in b["state"].items()}
    for k in a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert a["state"][k][name].shape == b["state"][k][name].shape
            torch.testing.assert_close(a["state"][k][name], b["state"][k][name], rtol=1e-5, atol=1e-7)
    for saved, fused_here in ((a, False), (b, True)):  # fused -> plain and plain -> fused
        opt, params = _adamw(True if fused_here else None)
        zero_like = SimpleNamespace(optimizer=opt)  # ZeRO and bf16 wrap the torch optimizer like this
        keep_adamw_impl(zero_like, fused=fused_here)
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["fused"] is (True if fused_here else None)
        assert opt.param_groups[0]["weight_decay"] == 0.05  # the saved group settings still load
        _steps(opt, params, 1)  # runs with the loaded state
        assert float(opt.state[params[0]]["step"]) == 4.0


def test_without_the_hook_the_checkpoint_would_switch_the_implementation() -> None:
    saved_fused, params = _adamw(True)
    _steps(saved_fused, params, 1)
    opt, _ = _adamw(None)
    opt.load_state_dict(saved_fused.state_dict())
    assert opt.param_groups[0]["fused"] is True  # torch takes the group settings from the checkpoint
