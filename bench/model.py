"""Model benchmark: our ViT against timm and raw kernels, measured side by side in one process.

Every ratio times A and B interleaved (A, B, A, B, ...) and takes the median of each, so a load
change hits both sides. Run: ``python bench/model.py`` (``--quick`` for fewer repetitions). On a
machine with CUDA it also measures ViT-B/16 bf16 training throughput and MFU at the largest batch
that fits, with and without gradient checkpointing (``--compile`` adds torch.compile).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from accel import free, largest_batch, peak_flops, throughput  # bench/accel.py, beside this file
from einops import rearrange
from torch import nn

from launch.memory_plan import activation_bytes
from pipeline.config import ModelConfig
from pipeline.model import ViT, forward_macs, vit_preset


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def interleaved(a: Callable[[], None], b: Callable[[], None], reps: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, timed alternately."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def train_step(model: nn.Module, img: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        F.cross_entropy(model(img), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def row(name: str, a: float, b: float, goal: str = "") -> None:
    print(f"{name:<58} {a * 1e3:>10.1f} {b * 1e3:>10.1f} {a / b:>7.3f}  {goal}")


def bench_vs_timm(reps: int, batch: int) -> None:
    torch.manual_seed(0)
    ours = vit_preset("S/16").train()
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False).train()
    for block in theirs.blocks:
        block.attn.fused_attn = True  # timm's switch for F.scaled_dot_product_attention
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    img, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    a, b = interleaved(train_step(ours, img, labels), train_step(theirs, img, labels), reps)
    row(f"train step ViT-S/16 224 b{batch} fp32: ours / timm", a, b, "goal <= 1.00")


def bench_attention(reps: int, batch: int) -> None:
    """Attention at ViT-S/16 sizes, forward + backward."""
    torch.manual_seed(0)
    ours = vit_preset("S/16").blocks[0].attn.train()
    x = torch.randn(batch, 197, 384, requires_grad=True)
    q, k, v = (torch.randn(batch, 6, 197, 64, requires_grad=True) for _ in range(3))

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: fn().sum().backward()

    def seed_style() -> torch.Tensor:  # the seed's attention: explicit softmax(QK^T / sqrt(d)) V
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=6) for t in ours.qkv(x).chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) * 64**-0.5, dim=-1)
        return ours.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))

    def raw_module() -> torch.Tensor:  # the same computation, written as bare calls
        qkv = F.linear(x, ours.qkv.weight, ours.qkv.bias).reshape(batch, 197, 3, 6, 64).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(batch, 197, 384)
        return F.linear(out, ours.proj.weight, ours.proj.bias)

    row(
        "attention fwd+bwd: our module / same ops as bare calls",
        *interleaved(run(lambda: ours(x)), run(raw_module), reps),
    )
    a, b = interleaved(run(lambda: ours(x)), run(lambda: F.scaled_dot_product_attention(q, k, v)), reps)
    row("attention fwd+bwd: our module (with qkv/proj) / bare F.sdpa", a, b, "(projections included)")
    row("attention fwd+bwd: seed naive softmax / ours", *interleaved(run(seed_style), run(lambda: ours(x)), reps))


def saved_activation_bytes(model: ViT, img: torch.Tensor) -> int:
    """Unique storage bytes autograd keeps for backward, parameters excluded. Checkpointed blocks keep
    their input alive for the recompute outside autograd's saved tensors: pre-hooks count those."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    def keep_input(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        keep(args[0])

    hooks = [block.register_forward_pre_hook(keep_input) for block in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(img)
    for hook in hooks:
        hook.remove()
    del out
    return sum(kept.values())


def round_robin(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed in rounds (every function once per round, in order)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


RECOMPUTE_MODES = (("none", 1), ("full", 1), ("selective", 1), ("every_k", 2), ("every_k", 3))


def bench_recompute(reps: int, batch: int) -> None:
    """Step time and activation memory of every recompute mode on ViT-S/16, side by side.

    Memory on CPU is measured as the unique storage bytes that autograd (and selective recompute's
    cache) keeps after the forward; the peak in backward adds one recomputed block on top, which is
    the memory plan's figure (launch/memory_plan.py, checked against the same measurement in tests).
    """
    torch.manual_seed(0)
    model = vit_preset("S/16").train()
    img, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    cfg = ModelConfig(**{k: v for k, v in model.init_kwargs.items() if k in ModelConfig.__dataclass_fields__})
    step = train_step(model, img, labels)

    def run(mode: str, every: int) -> Callable[[], None]:
        def go() -> None:
            model.set_recompute(mode, every=every)  # type: ignore[arg-type]
            step()

        return go

    names = {f"{mode}" + (f" k={every}" if mode == "every_k" else ""): (mode, every) for mode, every in RECOMPUTE_MODES}
    saved, peak = {}, {}
    for name, (mode, every) in names.items():
        model.set_recompute(mode, every=every)  # type: ignore[arg-type]
        saved[name] = saved_activation_bytes(model, img)
        peak[name] = activation_bytes(cfg, micro_batch=batch, precision="fp32", recompute=mode, every=every)
    medians = round_robin({name: run(*mode) for name, mode in names.items()}, reps)
    print(f"\nrecompute modes, ViT-S/16 224 b{batch} fp32 train step, median of {reps} interleaved rounds")
    print(
        f"{'mode':<12} {'step ms':>9} {'/ none':>7} {'saved MB':>9} {'none /':>7} {'peak MB (plan)':>15} {'none /':>7}"
    )
    for name in names:
        print(
            f"{name:<12} {medians[name] * 1e3:>9.1f} {medians[name] / medians['none']:>7.3f} "
            f"{saved[name] / 2**20:>9.1f} {saved['none'] / saved[name]:>7.2f} "
            f"{peak[name] / 2**20:>15.1f} {peak['none'] / peak[name]:>7.2f}"
        )
    print("goal: a mode at <= 1.15x step time with >= 8x less activation memory than none")


def bench_accelerator(args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    peak = peak_flops(device, args.peak_tflops)
    print(f"\n{args.accel_preset} 224 bf16 train step on {name} (peak {peak / 1e12 if peak else 'unknown'} TFLOPs)")
    print(f"{'checkpointing':<14} {'compile':<8} {'batch':>6} {'img/s':>9} {'MFU':>7}")
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = vit_preset(args.accel_preset).to(device).train()
        model.set_grad_checkpointing(ckpt)
        batch = largest_batch(model, device, args.start_batch, args.max_batch)
        flops_per_img = 3 * 2 * forward_macs(model)  # forward + backward, 2 flops per MAC
        runs = [(False, model)] + ([(True, torch.compile(model))] if args.compile else [])
        for compiled, runner in runs:
            try:
                img_s = throughput(runner, batch, device, args.reps)
            except torch.OutOfMemoryError:
                print(f"{str(ckpt):<14} {str(compiled):<8} {batch:>6}  out of memory")
                continue
            mfu = f"{flops_per_img * img_s / peak:>7.1%}" if peak else "      -"
            print(f"{str(ckpt):<14} {str(compiled):<8} {batch:>6} {img_s:>9.1f} {mfu}")
        del model, runs
        free()
    print("MFU counts model FLOPs (3 x forward): the recompute of checkpointing is not credited.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for all CPU timings)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per side (median; >= 5)")
    parser.add_argument("--quick", action="store_true", help="5 repetitions, smaller CPU batches")
    parser.add_argument("--skip-cpu", action="store_true", help="only the accelerator section")
    parser.add_argument("--recompute-only", action="store_true", help="only the recompute modes (CPU)")
    parser.add_argument("--recompute-batch", type=int, default=8, help="batch of --recompute-only")
    parser.add_argument(
        "--accel-device", default="cuda", help="device of the throughput section (cuda, or cpu to try it)"
    )
    parser.add_argument("--accel-preset", default="B/16", help="model of the throughput section")
    parser.add_argument("--start-batch", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    args = parser.parse_args()
    reps = 5 if args.quick else max(args.reps, 5)
    args.reps = reps
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"timm {timm.__version__}, GPU: {gpu}")  # fmt: skip
    if args.recompute_only:
        bench_recompute(reps, batch=args.recompute_batch)
        return
    if not args.skip_cpu:
        print(f"\n{'CPU, fp32, median of ' + str(reps) + ' interleaved reps':<58} {'A ms':>10} {'B ms':>10} {'A/B':>7}")
        bench_vs_timm(reps, batch=4 if args.quick else 8)
        bench_attention(reps, batch=8)
        bench_recompute(reps, batch=4 if args.quick else 8)
    device = torch.device(args.accel_device)
    if device.type == "cpu" or torch.cuda.is_available():
        bench_accelerator(args, device)
    else:
        print("\nno CUDA device: accelerator section skipped")


if __name__ == "__main__":
    main()
