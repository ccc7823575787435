"""The --dry-run memory plan: parameter counts, ZeRO's per-GPU bytes, activation bytes.

Counts are checked against the real model (its parameters, and the tensors autograd saves for
backward), not against a second copy of the formulas.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from launch.memory_plan import activation_bytes, count_params, format_plan, memory_plan, model_state_bytes
from pipeline.config import load_config
from pipeline.model import ViT

VARIANTS = [
    [],  # the embedded default: a tiny ViT
    ["model.preset=B/16", "model.image_size=224", "model.num_classes=1000"],
    ["model.heads=1", "model.dim_head=64", "model.qkv_bias=true"],  # one head as wide as the model: no projection
    ["model.patch_norm=true", "model.class_token=false", "model.pool=mean", "model.image_size=[32,16]"],
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_count_matches_the_model(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    assert count_params(cfg.model) == sum(p.numel() for p in ViT(**cfg.model.vit_kwargs()).parameters())


def test_b16_has_the_published_parameter_count() -> None:
    cfg = load_config(None, VARIANTS[1])
    assert count_params(cfg.model) == 86_567_656  # timm vit_base_patch16_224


def test_zero_stage_bytes_follow_the_paper() -> None:
    n = 1_000_000
    mixed = [model_state_bytes(n, stage=s, world_size=4, precision="bf16", offload_optimizer=False,
                               offload_params=False) for s in range(4)]  # fmt: skip
    # (params, grads, optimizer) bytes: 2+2+12 per parameter, partitioned over 4 ranks stage by stage
    assert [(b.params, b.grads, b.optimizer) for b in mixed] == [
        (2 * n, 2 * n, 12 * n), (2 * n, 2 * n, 3 * n), (2 * n, n // 2, 3 * n), (n // 2, n // 2, 3 * n),
    ]  # fmt: skip
    fp32 = model_state_bytes(n, stage=0, world_size=4, precision="fp32", offload_optimizer=False, offload_params=False)
    assert fp32.gpu_total == 16 * n
    off = model_state_bytes(n, stage=3, world_size=4, precision="bf16", offload_optimizer=True, offload_params=True)
    assert (off.params, off.grads, off.optimizer, off.cpu) == (0, n // 2, 0, 3 * n + n // 2)


def _saved_bytes(cfg, batch: int, *, checkpointing: bool = False, recompute: str = "none", every: int = 2) -> int:
    """Bytes of the tensors autograd keeps for backward after one forward (parameters excluded)."""
    torch.manual_seed(0)
    model = ViT(**cfg.model.vit_kwargs()).train()
    model.set_grad_checkpointing(checkpointing)
    if recompute != "none":
        model.set_recompute(recompute, every=every)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    size = cfg.model.image_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 3, size, size)).float().logsumexp(-1).mean()
    return sum(kept.values())


@pytest.mark.parametrize("overrides", [[], ["model.dim=64", "model.heads=2", "model.mlp_dim=96", "model.depth=3"]])
def test_activation_bytes_match_what_autograd_saves(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    for batch in (2, 5):
        measured = _saved_bytes(cfg, batch, checkpointing=False)
        planned = activation_bytes(cfg.model, micro_batch=batch, precision="fp32", recompute="none")
        assert abs(planned - measured) <= 4 * batch, (planned, measured)  # the loss's own (B,) output
        # Checkpointed: forward keeps each block's input; backward recomputes one block on top.
        measured = _saved_bytes(cfg, batch, checkpointing=True)
        shallower = replace(cfg.model, depth=cfg.model.depth - 1)
        one_block = activation_bytes(cfg.model, micro_batch=batch, precision="fp32", recompute="none")
        one_block -= activation_bytes(shallower, micro_batch=batch, precision="fp32", recompute="none")
        planned = activation_bytes(cfg.model, micro_batch=batch, precision="fp32", recompute="full")
        assert abs(planned - one_block - measured) <= 4 * batch, (planned - one_block, measured)


def test_plan_compares_the_total_with_the_gpu() -> None:
    b16 = [*VARIANTS[1], "train.precision=bf16", "train.zero_stage=1", "train.micro_batch_size=256"]
    fits = memory_plan(load_config(None, [*b16, "model.grad_checkpointing=true", "launch.gpu_mem_gb=80"]),
                       nodes=8, gpus_per_node=8)  # fmt: skip
    assert fits.world_size == 64 and fits.total < 80 * 1024**3
    assert "fits" in format_plan(fits)
    too_big = memory_plan(load_config(None, [*b16, "launch.gpu_mem_gb=12"]), nodes=1, gpus_per_node=8)
    assert too_big.total > 12 * 1024**3 and too_big.activations > 4 * too_big.activations_checkpointed
    assert "DOES NOT FIT" in format_plan(too_big)


SMALL = ["model.dim=64", "model.heads=2", "model.mlp_dim=96", "model.depth=5"]


@pytest.mark.parametrize("overrides", [SMALL, [*SMALL, "model.heads=1", "model.dim_head=64"]])
def test_recompute_modes_match_what_autograd_saves(overrides: list[str]) -> None:
    """Forward keeps the planned peak less the one block that backward recomputes on top of it."""
    cfg = load_config(None, overrides)
    m, batch = cfg.model, 3
    s, h, i = 65, m.dim, m.heads * m.dim_head  # (32 / 4)² patches + CLS
    plain = activation_bytes(m, micro_batch=batch, precision="fp32")
    block = plain - activation_bytes(replace(m, depth=m.depth - 1), micro_batch=batch, precision="fp32")
    # selective: per block the input, qkv, attention output + fp32 log-sum-exp, fc1, and the two projections
    projections = 2 if (m.heads == 1 and m.dim_head == h) else 3
    kept = 4 * s * batch * (projections * h + 4 * i + m.mlp_dim) + 4 * m.heads * s * batch
    planned = activation_bytes(m, micro_batch=batch, precision="fp32", recompute="selective")
    assert planned == plain - m.depth * (block - kept) + (block + 4 * 2 * s * batch * h - kept)
    measured = _saved_bytes(cfg, batch, recompute="selective")
    assert abs(planned - (block + 8 * s * batch * h - kept) - measured) <= 4 * batch, (planned, measured)
    # every_k with k=2 on 5 blocks: blocks 0, 2, 4 keep their input only, 1 and 3 keep everything
    for every, checkpointed in ((2, 3), (3, 2), (1, 5)):
        planned = activation_bytes(m, micro_batch=batch, precision="fp32", recompute="every_k", every=every)
        assert planned == plain - checkpointed * (block - 4 * s * batch * h) + block
        measured = _saved_bytes(cfg, batch, recompute="every_k", every=every)
        assert abs(planned - block - measured) <= 4 * batch, (every, planned - block, measured)
    full = activation_bytes(m, micro_batch=batch, precision="fp32", recompute="full")
    assert full == activation_bytes(m, micro_batch=batch, precision="fp32", recompute="every_k", every=1)


def test_plan_lists_every_recompute_mode_and_totals_the_configured_one() -> None:
    b16 = [*VARIANTS[1], "train.precision=bf16", "train.micro_batch_size=64"]
    plan = memory_plan(load_config(None, [*b16, "model.recompute=every_k", "model.recompute_every=3"]),
                       nodes=1, gpus_per_node=8)  # fmt: skip
    acts = plan.activations_by_mode
    assert list(acts) == ["none", "full", "selective", "every_k"]
    assert acts["full"] < acts["selective"] < acts["every_k"] < acts["none"]  # k=3: 4 of 12 blocks checkpointed
    assert plan.total == plan.stages[plan.zero_stage].gpu_total + acts["every_k"]
    text = format_plan(plan)
    assert "    every_k    * " in text and "(model.recompute_every=3)" in text
    legacy = memory_plan(load_config(None, [*b16, "model.grad_checkpointing=true"]), nodes=1, gpus_per_node=8)
    assert legacy.recompute == "full" and legacy.total == legacy.stages[legacy.zero_stage].gpu_total + acts["full"]


MAE = ["train.objective=mae", "mae.decoder_dim=32", "mae.decoder_depth=2", "mae.decoder_heads=4"]


def _mae_saved_bytes(cfg, batch: int, *, recompute: str = "none") -> int:
    """As _saved_bytes, for the MAE (encoder on the visible patches, decoder, masked-patch loss)."""
    from pipeline.model.mae import MaskedAutoencoder

    torch.manual_seed(0)
    model = MaskedAutoencoder(**cfg.model.vit_kwargs(), **cfg.mae.model_kwargs()).train()
    model.set_recompute(recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    size = cfg.model.image_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 3, size, size), generator=torch.Generator().manual_seed(0)).loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("overrides", [[], ["model.dim=64", "model.heads=2", "model.mlp_dim=96", "model.depth=3"]])
def test_mae_plan_matches_what_autograd_saves(overrides: list[str]) -> None:
    from launch.memory_plan import mae_activation_bytes, mae_param_count
    from pipeline.model.mae import MaskedAutoencoder

    cfg = load_config(None, [*MAE, *overrides])
    model = MaskedAutoencoder(**cfg.model.vit_kwargs(), **cfg.mae.model_kwargs())
    assert mae_param_count(cfg.model, cfg.mae) == sum(p.numel() for p in model.parameters())
    for batch in (2, 5):
        planned = mae_activation_bytes(cfg.model, cfg.mae, micro_batch=batch, precision="fp32", recompute="none")
        assert planned == _mae_saved_bytes(cfg, batch)
        # The encoder sees 17 of 65 tokens: far less than the classifier keeps for its blocks alone.
        assert planned < activation_bytes(cfg.model, micro_batch=batch, precision="fp32", recompute="none")


def test_mae_vit_b16_plan_counts_a_quarter_of_the_tokens_and_the_decoder() -> None:
    b16 = ["model.preset=B/16", "model.image_size=224", "model.num_classes=1000", "train.precision=bf16",
           "train.micro_batch_size=64", "train.global_batch_size=512"]  # fmt: skip
    mae = load_config(None, [*b16, "train.objective=mae"])  # MAE's decoder: 8 blocks of width 512
    plan = memory_plan(mae, nodes=1, gpus_per_node=8)
    # MAE's ViT-B decoder (models_mae.py, its fixed position embedding aside): embed 768x512 + 512, mask
    # token 512, 8 blocks of 12·512² + 13·512, norm 2·512, prediction 512x768 + 768.
    assert plan.num_params == 86_567_656 + 393_728 + 512 + 8 * 3_152_384 + 1_024 + 393_984
    text = format_plan(plan)
    assert (
        "the encoder sees 50 of 197 tokens (mae.mask_ratio=0.75), the decoder (8 blocks of width 512) all 197" in text
    )
    classify = memory_plan(load_config(None, b16), nodes=1, gpus_per_node=8)
    ratio = plan.activations / classify.activations
    # The encoder's blocks keep ~1/4 of the classifier's, but MAE's 8-block decoder on all 197 tokens
    # (width 512) keeps about as much again: ~0.73 of the classifier in all.
    assert 0.7 < ratio < 0.75, ratio


def test_background_saves_plan_each_ranks_shards_in_host_memory() -> None:
    """The formula against DeepSpeed's files: tests/train/test_training.py (the async kill test)."""
    b16 = [*VARIANTS[1], "train.precision=bf16", "checkpoint.async_save=true"]
    n = count_params(load_config(None, b16).model)
    by_stage = {
        stage: memory_plan(load_config(None, [*b16, f"train.zero_stage={stage}"]), nodes=2, gpus_per_node=8)
        for stage in (1, 3)
    }
    assert by_stage[1].checkpoint_staging == (
        2 * n + round(12 * n / 16),
        round(12 * n / 16),
    )  # 16-bit weights on rank 0
    assert by_stage[3].checkpoint_staging == (round(12 * n / 16),) * 2  # stage 3: the weights are partitioned too
    rank0, other = by_stage[1].checkpoint_staging
    assert f"held in host memory: {rank0 / 2**20:.2f} MiB on rank 0" in format_plan(by_stage[1])
    assert f"{(rank0 + 7 * other) / 2**20:.2f} MiB on node 0" in format_plan(by_stage[1])
    fp32 = memory_plan(load_config(None, [*VARIANTS[1], "train.zero_stage=0"]), nodes=1, gpus_per_node=8)
    assert fp32.checkpoint_staging == (12 * n, 0) and "would hold (checkpoint.async_save=true)" in format_plan(fp32)
