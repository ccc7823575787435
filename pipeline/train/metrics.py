"""Throughput and model-FLOPs utilisation (MFU) bookkeeping for the training loop."""

from __future__ import annotations

import time

import torch

# Dense bf16/fp16 tensor-core peaks per device, TFLOP/s (vendor data sheets). MFU follows the
# PaLM definition: 3 x forward FLOPs per sample (forward + backward), recomputation not counted.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,
}


def device_peak_tflops(configured: float, device: str) -> float | None:
    """The configured peak, else the data-sheet peak of this GPU; None when unknown (e.g. CPU)."""
    if configured > 0:
        return configured
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def mfu(img_per_s_per_device: float, forward_macs: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    flops_per_img = 3 * 2 * forward_macs  # 2 FLOPs per multiply-accumulate; backward = 2 x forward
    return img_per_s_per_device * flops_per_img / (peak_tflops * 1e12)


class Window:
    """Accumulates per-step numbers between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.images = 0
        self.data_wait = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0

    def add(self, *, images: int, data_wait: float, loss: float | None) -> None:
        self.steps += 1
        self.images += images
        self.data_wait += data_wait
        if loss is not None:
            self.loss_sum += loss
            self.loss_count += 1

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "elapsed": elapsed,
            "img_per_s": self.images / elapsed,
            "wait_frac": min(1.0, self.data_wait / elapsed),
            "loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
        }
