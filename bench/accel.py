"""Training-step throughput of a model on one device: the largest batch that fits, images/s, peak memory.

Shared by bench/model.py (its accelerator section) and bench/gpu.py. The step is the plain one a GPU
benchmark quotes: random images and labels already on the device, bf16 autocast, cross-entropy,
AdamW (torch's fused kernel on CUDA). No DeepSpeed and no loader: bench/gpu.py times those apart.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.presets import pair
from pipeline.train.metrics import device_peak_tflops


class NoBatchFits(RuntimeError):
    """Not even the first batch of the search fits on the device."""


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """FLOP/s of the device's dense bf16 peak: the override, else the data sheet's (pipeline/train/metrics.py)."""
    tflops = device_peak_tflops(override_tflops or 0.0, device.type)
    return tflops * 1e12 if tflops else None


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accel_step(model: nn.Module, batch: int, device: torch.device) -> Callable[[], None]:
    """One bf16-autocast training step on a fixed random batch at the model's image size."""
    h, w = pair(getattr(model, "init_kwargs", {}).get("image_size", 224))
    classes = getattr(model, "init_kwargs", {}).get("num_classes", 1000)
    img = torch.randn(batch, 3, h, w, device=device)  # (B, 3, H, W)
    labels = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(img), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _steps(model: nn.Module, batch: int, device: torch.device, n: int) -> None:
    step = accel_step(model, batch, device)
    for _ in range(n):
        step()
    sync(device)


def fits(model: nn.Module, batch: int, device: torch.device) -> bool:
    try:
        _steps(model, batch, device, 2)  # its activations and optimizer state die with its frame
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        free()


def largest_batch(model: nn.Module, device: torch.device, start: int, limit: int) -> int:
    """Double the batch from ``start`` until it runs out of memory or reaches ``limit``."""
    best, batch = 0, start
    while batch <= limit and fits(model, batch, device):
        best, batch = batch, batch * 2
    if not best:
        raise NoBatchFits(f"batch {start} does not fit on {device}; pass a smaller start batch")
    return best


def throughput(model: nn.Module, batch: int, device: torch.device, reps: int, steps: int = 3) -> float:
    """Images per second: median over ``reps`` timings of ``steps`` train steps, after 3 warm-up
    steps (which also pay torch.compile's compilation)."""
    step = accel_step(model, batch, device)
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append(time.perf_counter() - start)
    return batch * steps / statistics.median(times)
