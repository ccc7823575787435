"""Per-GPU memory plan of a run: ZeRO model states plus activations, from the config alone.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, sec. 3 and 5): with Ψ parameters and
N data-parallel ranks, mixed precision (bf16/fp16) keeps 2Ψ bytes of 16-bit parameters, 2Ψ of
16-bit gradients and KΨ = 12Ψ of optimizer states (fp32 master copy, Adam m and v); plain fp32
keeps 4Ψ + 4Ψ + 8Ψ (the parameters are their own master copy). Stage 1 partitions the optimizer
states over the N ranks, stage 2 also the gradients, stage 3 also the parameters. Offloading moves
the optimizer states (and, at stage 3, the parameters) to CPU memory. DeepSpeed's communication
buckets, the CUDA context and allocator fragmentation come on top (typically 1-3 GiB per GPU).

Activations are what one micro batch keeps for the backward pass, counted tensor by tensor for
our ViT (pipeline/model/vit.py), with s tokens, b images per micro batch, width h, attention width
i = heads x dim_head, MLP width m, e bytes per element (2 for bf16/fp16, 4 for fp32), per block:

    e * (4sbh + 4sbi + 2sbm) + 4asb + 16sb     [+ (2sbh + sbm) one-byte dropout masks when dropout > 0]

    4sbh: inputs of norm1, qkv, norm2, fc1     4sbi: q, k, v and the attention output
    2sbm: inputs of GELU and fc2                4asb: fp32 log-sum-exp of fused attention
    16sb: fp32 mean and 1/std of the two LayerNorms

This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
eq. 1: 34sbh + 5as²b at e=2) without the 5as²b attention-matrix terms, which the fused attention of
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels) does not store. Outside the
blocks: the flattened patches (b·N·C·p²), the last block's output (CLS pooling selects a view of it,
which keeps all of it alive), the pooled vector through norm and head, and fp32 logits.

Recompute (``model.recompute``, see ``ViT.set_recompute``) trades these for compute in backward:

- full: every block keeps only its input (e·sbh) and one block at a time is recomputed in
  backward, so the peak is L·e·sbh + one block + the outside terms.
- every_k: blocks 0, k, 2k, ... (c = ceil(L/k) of them) as in full, the others keep everything:
  (L - c) blocks + c·e·sbh + one block.
- selective: each block keeps its input, the outputs of its four matmuls and of fused attention,
  e·(3sbh + 4sbi + sbm) + 4asb (the output projection's sbh is absent when the model has none; with
  attention dropout the attention kernel is recomputed, so its sbi and 4asb are not kept). Backward
  redoes one block's norms, GELU and masks on top: one block + 2e·sbh - what it keeps (the 2e·sbh:
  the projection outputs it keeps, which a plain block does not).

A background checkpoint save (``checkpoint.async_save``) keeps a host-memory copy of each rank's
checkpoint shards for the whole run (pipeline/train/staging.py): rank 0 holds the module weights
(2Ψ or 4Ψ; none at stage 3, where the parameters live in the partitions) and every rank its
partition of the fp32 master copy and Adam's moments, 12Ψ/N (at plain fp32 stage 0, rank 0 holds
all of Adam's 8Ψ and the weights are the master copy).

tests/launch/test_memory_plan.py checks each formula against the tensors autograd actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import Config, MAEConfig, ModelConfig
from pipeline.model.presets import pair
from pipeline.model.vit import RECOMPUTE_MODES, Recompute
from pipeline.train.batch import plan_batch

GiB = 1024**3
# (16-bit or fp32 parameters, gradients, optimizer states) bytes per parameter
_STATE_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}


def _geometry(model: ModelConfig) -> tuple[int, int, int]:
    """(patches, patch_dim, tokens) of the ViT the config builds."""
    (ih, iw), (ph, pw) = pair(model.image_size), pair(model.patch_size)
    patches = (ih // ph) * (iw // pw)
    return patches, model.channels * ph * pw, patches + int(model.class_token)


def count_params(model: ModelConfig) -> int:
    """Parameters of ``pipeline.model.ViT(**model.vit_kwargs())``, counted analytically."""
    patches, patch_dim, tokens = _geometry(model)
    d, inner, m = model.dim, model.heads * model.dim_head, model.mlp_dim
    embed = patch_dim * d + d + tokens * d  # patch projection, position embedding
    embed += d if model.class_token else 0
    embed += 2 * patch_dim + 2 * d if model.patch_norm else 0  # LayerNorms around the projection
    qkv = d * 3 * inner + (3 * inner if model.qkv_bias else 0)
    proj = 0 if (model.heads == 1 and model.dim_head == d) else inner * d + d
    block = 2 * d + qkv + proj + 2 * d + (d * m + m) + (m * d + d)  # norm1, attention, norm2, MLP
    head = d * model.num_classes + model.num_classes
    return embed + model.depth * block + 2 * d + head


@dataclass(frozen=True)
class StageBytes:
    """Model-state bytes per GPU at one ZeRO stage; ``cpu`` is what offloading moves to host memory."""

    stage: int
    params: int
    grads: int
    optimizer: int
    cpu: int

    @property
    def gpu_total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(
    num_params: int, *, stage: int, world_size: int, precision: str, offload_optimizer: bool, offload_params: bool
) -> StageBytes:
    """ZeRO's per-GPU bytes for parameters, gradients and optimizer states (see the module doc)."""
    per_param, per_grad, per_state = _STATE_BYTES[precision]
    n = world_size
    params = num_params * per_param / (n if stage >= 3 else 1)
    grads = num_params * per_grad / (n if stage >= 2 else 1)
    optimizer = num_params * per_state / (n if stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer and stage >= 1:
        cpu, optimizer = cpu + optimizer, 0.0
    if offload_params and stage == 3:
        cpu, params = cpu + params, 0.0
    return StageBytes(stage, round(params), round(grads), round(optimizer), round(cpu))


def _block_terms(model: ModelConfig, *, micro_batch: int, e: int, tokens: int | None = None) -> tuple[int, int]:
    """(bytes a plain block keeps, bytes a selectively recomputed block keeps), formulas in the module doc;
    ``tokens``: how many the blocks see when not all (MAE's encoder)."""
    s = tokens if tokens is not None else _geometry(model)[2]
    b, h, m, a = micro_batch, model.dim, model.mlp_dim, model.heads
    i = model.heads * model.dim_head
    block = e * (4 * s * b * h + 4 * s * b * i + 2 * s * b * m) + 4 * a * s * b + 16 * s * b
    if model.dropout > 0:
        block += 2 * s * b * h + s * b * m
    # the block input and the outputs of the attention projection (absent in a one-head model) and of fc2
    kept_sbh = 2 if (model.heads == 1 and model.dim_head == h) else 3
    selective = e * (kept_sbh * s * b * h + 3 * s * b * i + s * b * m)
    if model.dropout == 0:  # the fused attention's output and log-sum-exp
        selective += e * s * b * i + 4 * a * s * b
    return block, selective


def activation_bytes(
    model: ModelConfig, *, micro_batch: int, precision: str, recompute: Recompute = "none", every: int = 2
) -> int:
    """Peak bytes one micro batch keeps for backward under ``recompute`` (formulas in the module doc)."""
    patches, patch_dim, s = _geometry(model)
    b, h = micro_batch, model.dim
    e = 4 if precision == "fp32" else 2
    block, selective = _block_terms(model, micro_batch=micro_batch, e=e)
    last_tokens = s * b * h if (model.pool == "cls" or model.norm_before_pool) else 0
    outside = e * (b * patches * patch_dim + last_tokens + b * h) + 8 * b + 4 * b * model.num_classes
    depth = model.depth
    if recompute == "selective":
        return depth * selective + block + 2 * e * s * b * h - selective + outside
    checkpointed = {"none": 0, "full": depth, "every_k": len(range(0, depth, every))}[recompute]
    recomputed_block = block if checkpointed else 0
    return (depth - checkpointed) * block + checkpointed * e * s * b * h + recomputed_block + outside


def _decoder_config(model: ModelConfig, mae: MAEConfig) -> ModelConfig:
    """MAE's decoder blocks as a ModelConfig (pipeline/model/mae.py: MLP 4x, qkv bias, no dropout)."""
    d = mae.decoder_dim
    return replace(model, dim=d, depth=mae.decoder_depth, heads=mae.decoder_heads, dim_head=d // mae.decoder_heads,
                   mlp_dim=4 * d, qkv_bias=True, dropout=0.0)  # fmt: skip


def mae_param_count(model: ModelConfig, mae: MAEConfig) -> int:
    """Parameters of pipeline.model.mae.MaskedAutoencoder: the ViT's plus the decoder's (its input
    projection, mask token, blocks, norm and pixel prediction; the sin-cos positions are fixed)."""
    _, patch_dim, _ = _geometry(model)
    d = mae.decoder_dim
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return count_params(model) + model.dim * d + d + d + mae.decoder_depth * block + 2 * d + d * patch_dim + patch_dim


def mae_activation_bytes(
    model: ModelConfig, mae: MAEConfig, *, micro_batch: int, precision: str, recompute: Recompute
) -> int:
    """Peak bytes an MAE micro batch keeps for backward: the encoder's blocks on the P + K visible
    tokens (K = (1 - mask_ratio) N; any recompute mode checkpoints each whole block there, see
    MaskedAutoencoder.forward_encoder), the decoder's blocks on all P + N positions, and around them
    (per image): the image, the embedded patches the visible ones are gathered from (e·N·h), the
    encoder's final norm and the decoder's input (2e·s_e·h + 8s_e), the decoder's gather input
    (e·N·d), its final norm and prediction input (2e·s_d·d + 8s_d), the int64 shuffle and restore
    indices (16N), and the fp32 loss terms (4N·patch_dim + 4N + 4)."""
    patches, patch_dim, _ = _geometry(model)
    b, h, d, e = micro_batch, model.dim, mae.decoder_dim, 4 if precision == "fp32" else 2
    prefix = int(model.class_token)
    s_e, s_d = prefix + max(1, int(patches * (1 - mae.mask_ratio))), prefix + patches
    encoder_block, _ = _block_terms(model, micro_batch=b, e=e, tokens=s_e)
    decoder_block, _ = _block_terms(_decoder_config(model, mae), micro_batch=b, e=e, tokens=s_d)
    if recompute == "none":
        encoder = model.depth * encoder_block
    else:
        encoder = model.depth * e * s_e * b * h + encoder_block
    outside = b * (
        e * (patches * patch_dim + patches * h + 2 * s_e * h + patches * d + 2 * s_d * d)
        + 8 * s_e + 8 * s_d + 16 * patches + 4 * patches * patch_dim + 4 * patches + 4
    )  # fmt: skip
    return encoder + mae.decoder_depth * decoder_block + outside


def checkpoint_shard_bytes(num_params: int, *, stage: int, world_size: int, precision: str) -> tuple[int, int]:
    """(rank 0's, each other rank's) bytes of checkpoint shards: what a background save stages in host memory."""
    n = num_params
    if stage == 0 and precision == "fp32":
        return n * 4 + n * 8, 0  # one file on rank 0: weights (their own master copy) and Adam's moments
    partition = round(n * 12 / world_size)  # fp32 master copy + Adam's moments, partitioned
    weights = n * _STATE_BYTES[precision][0] if stage < 3 else 0
    return weights + partition, partition


@dataclass(frozen=True)
class MemoryPlan:
    num_params: int
    nodes: int
    ranks_per_node: int
    on_gpu: bool
    precision: str
    zero_stage: int
    micro_batch_size: int
    tokens: int
    stages: tuple[StageBytes, ...]  # stages 0..3, for comparison
    activations: int  # without recompute
    activations_checkpointed: int  # recompute=full
    activations_by_mode: dict[str, int]  # every recompute mode, "none" and "full" included
    recompute: str  # what the config asks for
    recompute_every: int
    gpu_mem_bytes: int  # 0: unknown
    checkpoint_staging: tuple[int, int]  # host bytes a background save keeps: rank 0, any other rank
    async_save: bool  # checkpoint.async_save
    note: str = ""  # what the objective changes (MAE: tokens the encoder sees, the decoder)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def total(self) -> int:
        """Model states at the configured stage + activations with the configured recompute."""
        return self.stages[self.zero_stage].gpu_total + self.activations_by_mode[self.recompute]


def memory_plan(cfg: Config, *, nodes: int, gpus_per_node: int) -> MemoryPlan:
    """The plan for ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs (0 GPUs: CPU ranks per node)."""
    ranks_per_node = gpus_per_node or cfg.launch.ranks_per_node
    world = nodes * ranks_per_node
    t, model = cfg.train, cfg.model
    mae = cfg.mae if t.objective == "mae" else None
    num_params = count_params(model) if mae is None else mae_param_count(model, mae)
    stages = tuple(
        model_state_bytes(
            num_params,
            stage=stage,
            world_size=world,
            precision=t.precision,
            offload_optimizer=t.offload_optimizer,
            offload_params=t.offload_params,
        )
        for stage in range(4)
    )
    micro = plan_batch(cfg.train, world).micro_batch_size  # refuses arithmetic that does not fit `world`

    by_mode = {
        mode: activation_bytes(model, micro_batch=micro, precision=t.precision, recompute=mode,
                               every=model.recompute_every)
        if mae is None else mae_activation_bytes(model, mae, micro_batch=micro, precision=t.precision, recompute=mode)
        for mode in RECOMPUTE_MODES
    }  # fmt: skip
    note = ""
    if mae is not None:
        patches, _, tokens = _geometry(model)
        visible = max(1, int(patches * (1 - mae.mask_ratio)))
        note = (f"MAE (train.objective=mae): the encoder sees {visible + tokens - patches} of {tokens} tokens "
                f"(mae.mask_ratio={mae.mask_ratio}), the decoder ({mae.decoder_depth} blocks of width "
                f"{mae.decoder_dim}) all {tokens}; parameters include the decoder")  # fmt: skip

    return MemoryPlan(
        num_params=num_params,
        nodes=nodes,
        ranks_per_node=ranks_per_node,
        on_gpu=gpus_per_node > 0,
        precision=t.precision,
        zero_stage=t.zero_stage,
        micro_batch_size=micro,
        tokens=_geometry(model)[2],
        stages=stages,
        activations=by_mode["none"],
        activations_checkpointed=by_mode["full"],
        activations_by_mode=by_mode,
        recompute=model.recompute_mode,
        recompute_every=model.recompute_every,
        gpu_mem_bytes=round(cfg.launch.gpu_mem_gb * GiB),
        note=note,
        checkpoint_staging=checkpoint_shard_bytes(num_params, stage=t.zero_stage, world_size=world,
                                                  precision=t.precision),
        async_save=cfg.checkpoint.async_save,
    )  # fmt: skip


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (GiB, MiB or KiB), width 10."""
    if n == 0:
        return f"{0:6d}    "
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:6.2f} {unit}"
    return f"{n / 1024:6.2f} KiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the text block `launch/submit.py --dry-run` prints."""
    device = "GPU" if plan.on_gpu else "rank (CPU ranks: no GPU memory involved)"
    p, g, o = _STATE_BYTES[plan.precision]
    lines = [
        f"memory plan per {device}: ViT with {plan.num_params:,} parameters ({plan.num_params / 1e6:.1f} M), "
        f"{plan.world_size} ranks ({plan.nodes} node(s) x {plan.ranks_per_node})",
        f"  model states ({plan.precision}: {p} B params + {g} B grads + {o} B optimizer states per parameter, "
        "ZeRO paper formulas):",
        "    stage      params       grads   optimizer       total   offloaded to CPU",
    ]
    for s in plan.stages:
        mark = " *" if s.stage == plan.zero_stage else "  "
        cells = "  ".join(_size(v) for v in (s.params, s.grads, s.optimizer, s.gpu_total, s.cpu))
        lines.append(f"    {s.stage}{mark}  {cells}")
    lines.append("    (* = train.zero_stage)")
    if plan.note:
        lines.append(f"  {plan.note}")
    lines.append(
        f"  activations per micro batch of {plan.micro_batch_size} images ({plan.tokens} tokens, fused attention), "
        "peak in backward by model.recompute:"
    )
    for mode, size in plan.activations_by_mode.items():
        mark = " *" if mode == plan.recompute else "  "
        every = f" (model.recompute_every={plan.recompute_every})" if mode == "every_k" else ""
        lines.append(f"    {mode:<10}{mark} {_size(size)}  none / this {plan.activations / size:4.1f}{every}")
    lines.append("    (* = model.recompute)")
    total = f"  total at stage {plan.zero_stage}: {_size(plan.total).strip()}"
    if plan.gpu_mem_bytes:
        share = plan.total / plan.gpu_mem_bytes
        verdict = "fits" if share <= 0.9 else "TIGHT (> 90%)" if share <= 1 else "DOES NOT FIT"
        total += f" of {_size(plan.gpu_mem_bytes).strip()} ({share:.0%}): {verdict}"
    elif plan.on_gpu:
        total += " (GPU memory unknown: set launch.gpu_mem_gb=80 to compare)"
    if plan.on_gpu:
        total += "; add 1-3 GiB for the CUDA context, DeepSpeed buffers and fragmentation"
    lines.append(total)
    lines.append(_staging_line(plan))
    return "\n".join(lines)


def _staging_line(plan: MemoryPlan) -> str:
    rank0, other = plan.checkpoint_staging
    node0 = rank0 + (plan.ranks_per_node - 1) * other
    held = "held in host memory" if plan.async_save else "would hold (checkpoint.async_save=true)"
    return (
        f"  background checkpoint saves {held}: {_size(rank0).strip()} on rank 0, {_size(other).strip()} "
        f"on each other rank, {_size(node0).strip()} on node 0"
    )
