"""The data path's CPU budget in --dry-run: cores per GPU rank from the measured decode rate per core."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from launch import submit
from launch.data_budget import DecodeRates, decode_budget, read_rates, target_img_per_s
from pipeline.config import load_config
from tests.launch.conftest import REPO

B16 = REPO / "configs" / "pretrain" / "vit_b16.yaml"
RATES = DecodeRates({"pil": 288.0, "torchvision": 250.0}, "measured here")


def b16(*overrides: str):
    return load_config(B16, ["launch.gpus_per_node=8", *overrides])


def test_vit_b16_target_is_the_45_percent_mfu_figure() -> None:
    target, why = target_img_per_s(b16())
    # 989e12 x 0.45 / (6 x 17.57 GMAC) = 4,223 img/s: the ~4,200 of issue 17
    assert round(target) == 4223
    assert why == "this model at 45% MFU of 989 TFLOP/s, 105.4 GFLOP per image"
    assert target_img_per_s(b16("launch.target_img_per_s_per_gpu=3000")) == (
        3000.0,
        "launch.target_img_per_s_per_gpu",
    )


def test_too_few_cpus_per_task_is_warned_with_the_fix() -> None:
    lines = decode_budget(b16("launch.cpus_per_task=8"), RATES).splitlines()
    assert lines[0] == (
        "data CPU budget per GPU rank: 4,223 img/s (this model at 45% MFU of 989 TFLOP/s, 105.4 GFLOP per image); "
        "decode rates: measured here"
    )
    # ceil(4223 / 288) = 15 decode cores + 1 for the rank; ceil(4223 / 250) = 17 + 1
    assert lines[1] == "  data.decoder=pil (this run's): 288 img/s per core -> 16 cores per rank"
    assert lines[2] == "  data.decoder=torchvision: 250 img/s per core -> 18 cores per rank"
    # 7 decode cores x 288 = 2,016 img/s = 48 % of 4,223
    assert lines[3].startswith("  WARNING: --cpus-per-task 8 < 16: the loader feeds ~48% of the target")
    assert "raise --cpus-per-task to 16, or decode on the GPU (nvJPEG) or train from pre-resized shards" in lines[3]
    # the config's 8 workers per rank cannot use 15 decode cores
    assert lines[4] == "  WARNING: data.num_workers=8 < 15 decode cores: set data.num_workers=15 to use them"


def test_enough_cpus_and_the_torchvision_decoder() -> None:
    text = decode_budget(b16("launch.cpus_per_task=18", "data.decoder=torchvision", "data.num_workers=17"), RATES)
    assert "  data.decoder=torchvision (this run's): 250 img/s per core -> 18 cores per rank" in text
    assert "  --cpus-per-task 18 >= 18: enough" in text
    assert "WARNING" not in text
    unset = decode_budget(b16("launch.cpus_per_task=0"), RATES)
    assert "--cpus-per-task is not set (the scheduler's default): ask for >= 16, or decode on the GPU" in unset


def test_nvjpeg_needs_no_decode_cores_and_is_not_refused_on_the_login_node() -> None:
    # the launcher may run where there is no GPU: the rank refuses nvjpeg without CUDA, not --dry-run
    lines = decode_budget(b16("launch.cpus_per_task=4", "data.decoder=nvjpeg"), RATES).splitlines()
    assert lines[1:] == [
        "  data.decoder=pil: 288 img/s per core -> 16 cores per rank",
        "  data.decoder=torchvision: 250 img/s per core -> 18 cores per rank",
        "  data.decoder=nvjpeg (this run's): workers read bytes only, JPEGs decode on the GPU",
    ]


def test_rates_file_written_by_the_bench_is_read_else_the_stated_default(tmp_path: Path) -> None:
    missing = read_rates(tmp_path / "none.json")
    assert missing.per_core == {"pil": 300.0, "torchvision": 300.0}
    assert "not measured on this machine" in missing.source
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "bench" / "data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode_rate.json"
    bench.write_rates(out, {"pil": 411.26, "torchvision": 352.0}, kb=62.4, size=224)
    assert json.loads(out.read_text())["img_per_core_s"] == {"pil": 411.3, "torchvision": 352.0}
    got = read_rates(out)
    assert got.per_core == {"pil": 411.3, "torchvision": 352.0}
    assert "500x375 JPEG (62 KB) -> 224 px crops (decode_rate.json)" in got.source
    # 4,223 / 411.3 -> 11 decode cores + 1
    assert "data.decoder=pil (this run's): 411 img/s per core -> 12 cores per rank" in decode_budget(b16(), got)


def test_cpu_ranks_have_no_gpu_budget_in_the_dry_run_text() -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    assert submit.cpu_plan(cfg, "slurm").splitlines()[-1] == (
        "data CPU budget: CPU ranks (no GPU to keep fed); not planned"
    )
    assert "-> 16 cores per rank" in submit.cpu_plan(b16("launch.cpus_per_task=8"), "slurm")
