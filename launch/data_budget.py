"""The CPU budget of the data path, printed by ``--dry-run``: cores per GPU rank to decode at the GPU's pace.

One H100/H200 at the project's 45 % MFU target trains ViT-B/16 at ~4,200 img/s (989 TFLOP/s dense
bf16 / 105.5 GFLOP per training image, issue 17). Decoding a JPEG with random-resized-crop costs a
few hundred images per CPU second, so a GPU rank needs a dozen cores or more for its loader workers,
or the GPU waits on data. ``python bench/data.py --only decode`` measures the rate per core of each
CPU decoder and writes it to bench/decode_rate.json, which this module reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.model.flops import vit_forward_macs

RATE_FILE = Path(__file__).resolve().parent.parent / "bench" / "decode_rate.json"
DECODERS = ("pil", "torchvision")
# The low end of the 300-600 img/s per core of ImageNet JPEG decode + random-resized-crop (issue 17),
# used when no measurement exists: a budget planned on it errs towards more cores.
DEFAULT_RATE = 300.0
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
TARGET_MFU = 0.45


@dataclass(frozen=True)
class DecodeRates:
    per_core: dict[str, float]  # decoder -> images per CPU second of one process
    source: str  # where the figures come from, said in the plan


def read_rates(path: Path = RATE_FILE) -> DecodeRates:
    """The measured rates (bench/data.py writes them), else the stated default for each decoder."""
    try:
        saved = json.loads(path.read_text())
        measured = {d: float(saved["img_per_core_s"][d]) for d in DECODERS}
    except (OSError, ValueError, KeyError, TypeError):
        fallback = f"default {DEFAULT_RATE:.0f} img/s per core, not measured on this machine (run bench/data.py)"
        return DecodeRates({d: DEFAULT_RATE for d in DECODERS}, fallback)
    where = f"{saved.get('image', 'JPEGs')} -> {saved.get('crop', '?')} px crops"
    return DecodeRates(measured, f"measured by bench/data.py on {saved.get('host', '?')}, {where} ({path.name})")


def target_img_per_s(cfg: Config) -> tuple[float, str]:
    """Images/s one GPU should train: launch.target_img_per_s_per_gpu, else this model at 45 % MFU."""
    if cfg.launch.target_img_per_s_per_gpu > 0:
        return cfg.launch.target_img_per_s_per_gpu, "launch.target_img_per_s_per_gpu"
    flops = 6 * vit_forward_macs(**cfg.model.vit_kwargs())  # forward + backward = 3 x 2 flops per MAC
    rate = TARGET_MFU * PEAK_TFLOPS * 1e12 / flops
    return rate, f"this model at {TARGET_MFU:.0%} MFU of {PEAK_TFLOPS:.0f} TFLOP/s, {flops / 1e9:.1f} GFLOP per image"


def cores_needed(target: float, per_core: float) -> int:
    """Decode cores plus one for the rank's own process (the training step, the batch hand-off)."""
    return math.ceil(target / per_core) + 1


def decode_budget(cfg: Config, rates: DecodeRates | None = None) -> str:
    """The budget lines of ``--dry-run``, with a warning when --cpus-per-task is below the chosen decoder's."""
    la = cfg.launch
    if not la.gpus_per_node:
        return "data CPU budget: CPU ranks (no GPU to keep fed); not planned"
    rates = rates or read_rates()
    target, why = target_img_per_s(cfg)
    lines = [f"data CPU budget per GPU rank: {target:,.0f} img/s ({why}); decode rates: {rates.source}"]
    for dec in DECODERS:
        rate, chosen = rates.per_core[dec], " (this run's)" if dec == cfg.data.decoder else ""
        lines.append(
            f"  data.decoder={dec}{chosen}: {rate:,.0f} img/s per core -> {cores_needed(target, rate)} cores per rank"
        )
    if cfg.data.decoder == "nvjpeg":  # the launcher may run on a login node: the rank checks for CUDA
        lines.append("  data.decoder=nvjpeg (this run's): workers read bytes only, JPEGs decode on the GPU")
        return "\n".join(lines)
    need = cores_needed(target, rates.per_core[cfg.data.decoder])
    fix = "decode on the GPU (nvJPEG) or train from pre-resized shards (smaller JPEGs decode faster)"
    if not la.cpus_per_task:
        lines.append(f"  --cpus-per-task is not set (the scheduler's default): ask for >= {need}, or {fix}")
    elif la.cpus_per_task < need:
        fed = (la.cpus_per_task - 1) * rates.per_core[cfg.data.decoder] / target
        lines.append(
            f"  WARNING: --cpus-per-task {la.cpus_per_task} < {need}: the loader feeds ~{fed:.0%} of the target "
            f"and the GPU waits on data; raise --cpus-per-task to {need}, or {fix}"
        )
    else:
        lines.append(f"  --cpus-per-task {la.cpus_per_task} >= {need}: enough")
    if cfg.data.num_workers < need - 1:  # each worker decodes on one core
        lines.append(
            f"  WARNING: data.num_workers={cfg.data.num_workers} < {need - 1} decode cores: "
            f"set data.num_workers={need - 1} to use them"
        )
    return "\n".join(lines)
