"""The DeepSpeed seam: the only module of the project that imports deepspeed.

Everything DeepSpeed-specific sits here: the config dict derived from our typed config, engine
creation, sharded save/load, the universal-checkpoint conversion for a changed world size, and
offline consolidation of a sharded checkpoint into one fp32 state dict.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from pipeline.artifacts.checkpoints import CheckpointError, read_torch
from pipeline.config import OptimConfig, TrainConfig
from pipeline.train.batch import BatchPlan

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine as Engine  # for annotations; deepspeed loads on first use

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]


def _deepspeed(device: Device) -> Any:
    # DeepSpeed picks its accelerator at import time; pin it so a CPU run on a GPU host stays CPU.
    os.environ.setdefault("DS_ACCELERATOR", device)
    import deepspeed

    return deepspeed


def init_distributed(device: Device, timeout_s: float = 1800.0) -> None:
    """Join the process group (gloo on CPU, NCCL on GPU) from the exported torchrun variables."""
    ds = _deepspeed(device)
    if not torch.distributed.is_initialized():
        ds.init_distributed(
            dist_backend="nccl" if device == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )


def ds_config(
    *, train: TrainConfig, optim: OptimConfig, plan: BatchPlan, device: Device, load_universal: bool = False
) -> dict:
    """DeepSpeed's config dict, derived from our typed config slices (never written by hand)."""
    t = train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if t.zero_stage >= 2:
        zero["overlap_comm"] = device == "cuda"
    o = optim
    adam: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    adam.update(_ADAMW_PARAMS[adamw_impl(device, offload_optimizer=t.offload_optimizer)])
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        # plain stage-0 fp32 clips in guard_nonfinite_grads, where a non-finite step is also skipped
        "gradient_clipping": 0.0 if _plain_fp32(t) else o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


AdamWImpl = Literal["torch", "torch_fused", "deepspeed_cpu"]

# DeepSpeed's optimizer params per choice: ``torch_adam`` makes DeepSpeed build torch.optim.AdamW
# and pass the other keys through (``fused``); without it DeepSpeed builds its own Adam (CPUAdam
# when the optimizer is offloaded, else FusedAdam, which must be compiled against CUDA on the node).
_ADAMW_PARAMS: dict[AdamWImpl, dict[str, Any]] = {
    "torch": {"torch_adam": True},
    "torch_fused": {"torch_adam": True, "fused": True},
    "deepspeed_cpu": {},
}


def adamw_impl(device: Device, *, offload_optimizer: bool) -> AdamWImpl:
    """The fastest correct AdamW for where the optimizer state lives.

    Offloaded state is stepped on the CPU by DeepSpeed's vectorised CPUAdam. On a GPU, torch's fused
    AdamW (one kernel per group and dtype, fp32 math, bf16 params supported) needs no build on the
    node, unlike DeepSpeed's FusedAdam, and is at least as fast. On CPU: torch's AdamW as before.
    """
    if offload_optimizer:
        return "deepspeed_cpu"
    return "torch_fused" if device == "cuda" else "torch"


def initialize(
    model: torch.nn.Module, param_groups: list[dict], config: dict, device: Device, *, compile: bool = False
) -> Engine:
    ds = _deepspeed(device)
    engine, *_ = ds.initialize(model=model, model_parameters=param_groups, config=config)
    keep_adamw_impl(engine.optimizer, fused=bool(config["optimizer"]["params"].get("fused")))
    if compile:
        # After initialize, not before: DeepSpeed compiles its module in place (nn.Module.compile), so
        # the state dict keys stay free of torch.compile's ``_orig_mod.`` and checkpoints and exports
        # load into eager runs and back; ZeRO's hooks are in place before the first trace.
        engine.compile()
    return engine


def keep_adamw_impl(optimizer: Any, *, fused: bool) -> None:
    """Keep this run's AdamW implementation when a checkpoint written under the other one loads.

    torch's ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, ``fused``
    and ``foreach`` included, so a GPU run resumed from a CPU checkpoint would silently lose the fused
    kernel (and the reverse would ask for it where it may not exist). The state itself (step,
    exp_avg, exp_avg_sq per parameter) has one layout either way; only the step counter's device
    differs (fused keeps it next to the parameter).
    """
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap the torch optimizer
    if not isinstance(base, torch.optim.AdamW):
        return  # DeepSpeed's CPUAdam: its own state, always the same choice for offloaded runs

    def restore(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = (True, None) if fused else (None, None)
            for p in group["params"]:
                state = opt.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device if fused else "cpu", torch.float32)

    base.register_load_state_dict_post_hook(restore)


def param_groups_of(engine: Engine) -> list[dict]:
    """The optimizer's parameter groups (ours, carried through ZeRO's wrappers)."""
    return engine.optimizer.param_groups


# Plain stage 0's gradient norm, measured by guard_nonfinite_grads (DeepSpeed reports none there). Kept
# here rather than as an attribute on DeepSpeed's engine object, whose attributes are DeepSpeed's.
_MEASURED_NORM: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def grad_norm(engine: Engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = _MEASURED_NORM.get(engine)
    return None if norm is None else float(norm)


def _plain_fp32(train: TrainConfig) -> bool:
    return train.zero_stage == 0 and train.precision == "fp32"


def guard_nonfinite_grads(engine: Engine, max_norm: float) -> bool:
    """Plain stage-0 fp32 only: clip, or drop non-finite gradients; True if it dropped them.

    ZeRO stages 1-3 and bf16/fp16 skip a step whose gradient norm is not finite themselves; plain
    stage 0 in fp32 would apply it (and DeepSpeed's own clipping there fails on None gradients).
    So there we clip ourselves (DeepSpeed's clipping is off, see ds_config) and set non-finite
    gradients to None, which makes AdamW leave those weights and moments alone: a true skip.
    """
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return False
    if not engine.is_gradient_accumulation_boundary():
        return False
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    _MEASURED_NORM[engine] = float(norm)
    if torch.isfinite(norm):
        return False
    for p in params:
        p.grad = None
    return True


def step_applied(engine: Engine) -> bool:
    return bool(engine.was_step_applied())


@contextmanager
def _recording(engine: Engine, method: Literal["save", "load"]) -> Iterator[list[Path]]:
    """The paths this rank passes to the checkpoint engine's ``save``/``load`` meanwhile.

    DeepSpeed routes every shard it writes or reads through ``engine.checkpoint_engine``
    (``save(state_dict, path)``, ``load(path, map_location)``); watching it tells each rank which
    files it wrote (to checksum them) and which file a failed load was reading.
    """
    target = engine.checkpoint_engine
    shadowed = method in vars(target)
    original = getattr(target, method)
    paths: list[Path] = []

    def save(state_dict: Any, path: str) -> Any:
        paths.append(Path(path))
        return original(state_dict, path)

    def load(path: str, map_location: Any = None) -> Any:
        paths.append(Path(path))
        return original(path, map_location=map_location)

    setattr(target, method, save if method == "save" else load)
    try:
        yield paths
    finally:
        if shadowed:
            setattr(target, method, original)
        else:
            delattr(target, method)


def save(engine: Engine, ckpt_dir: Path, tag: str) -> list[Path]:
    """Collective: every rank writes its shards. ``latest`` is ours (written after the commit).

    Returns the files this rank wrote (DeepSpeed's own recovery-script copy is not among them).
    """
    with _recording(engine, "save") as written:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    return written


@contextmanager
def _deferring(engine: Engine, snapshot: Callable[[Any, str], Any]) -> Iterator[list[tuple[Path, Callable[[], None]]]]:
    """Each ``checkpoint_engine.save(state_dict, path)`` meanwhile becomes a snapshot plus a write for later."""
    target = engine.checkpoint_engine
    shadowed = "save" in vars(target)
    original = target.save
    writes: list[tuple[Path, Callable[[], None]]] = []

    def save(state_dict: Any, path: str) -> None:
        copy = snapshot(state_dict, os.path.basename(path))
        writes.append((Path(path), functools.partial(original, copy, path)))

    target.save = save
    try:
        yield writes
    finally:
        if shadowed:
            target.save = original
        else:
            del target.save


def save_deferred(
    engine: Engine, ckpt_dir: Path, tag: str, snapshot: Callable[[Any, str], Any]
) -> list[tuple[Path, Callable[[], None]]]:
    """Collective like :func:`save`, but no shard is written yet: ``snapshot(state_dict, file_name)``
    copies each one to host memory, and the returned ``(path, write)`` pairs write them later.

    ``write()`` is DeepSpeed's own checkpoint engine (its serialization settings) run on the
    snapshot, so the files, their names and layout are what :func:`save` writes; loading, the
    universal conversion and zero_to_fp32 read them unchanged. Only small files are written now
    (DeepSpeed's recovery-script copy on rank 0) and the tag's directories.
    """
    with _deferring(engine, snapshot) as writes:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    return writes


def load(engine: Engine, ckpt_dir: Path, tag: str) -> None:
    """Collective load of ``tag``; any failure raises CheckpointError naming the file being read."""
    with _recording(engine, "load") as read:
        try:
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
        except Exception as e:  # torch/pickle errors do not say which file they were reading
            where = read[-1] if read else ckpt_dir / tag
            raise CheckpointError(f"loading {where} failed: {type(e).__name__}: {e}") from e
    if path is None:
        # DeepSpeed only warns here; a silent fresh start is exactly what we must never do.
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Collective: every rank's ``obj``, in rank order, on every rank (a process outside a group is alone)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def union_across_ranks(items: list[str]) -> list[str]:
    """Collective: all ranks' ``items`` concatenated in rank order (the same list on every rank)."""
    return [item for part in all_gather(items) for item in part]


def to_universal(tag_dir: Path) -> Path:
    """Convert a sharded checkpoint to DeepSpeed's universal format (world-size independent).

    Run on one rank; the others wait at a barrier. The conversion is cached next to the source.
    """
    out = tag_dir.with_name(tag_dir.name + "_universal")
    done = out / ".converted"
    if done.exists():
        return out
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(out),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    log.info("converting %s to a universal checkpoint for a new world size", tag_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    done.touch()
    return out


def gathered_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """Collective: the live module weights, full, in fp32, on rank 0 (None elsewhere).

    Under ZeRO-3 the partitions are gathered; under bf16 these are the bf16 module weights (the
    fp32 master copy lives in the optimizer: use a checkpoint export for that).
    """
    if engine.zero_optimization_stage() == 3:
        sd = zero3_gathered_state_dict(engine)
    else:
        sd = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    if sd is None:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def zero3_gathered_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """ZeRO-3's partitions gathered into full 16-bit tensors on rank 0 (None elsewhere); collective.

    DeepSpeed's own ``save_16bit_model`` uses this private method and no public one returns the
    dict itself; tests/test_library_internals.py fails loudly if it goes away or changes its call.
    """
    return engine._zero3_consolidated_16bit_state_dict()


def consolidated_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a sharded checkpoint, on one process, without an engine."""
    if zero_stage == 0:
        states = read_torch(tag_dir / "mp_rank_00_model_states.pt")  # errors name the file
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as e:  # DeepSpeed's reader does not always say which shard failed
        raise CheckpointError(f"consolidating {tag_dir} failed: {type(e).__name__}: {e}") from e
    return {k: v.float().contiguous() for k, v in sd.items()}
