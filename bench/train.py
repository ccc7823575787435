"""Training-engine benchmark: checkpoint bandwidth, MLflow overhead, 2-rank CPU throughput.

    python bench/train.py            # about 3-5 minutes on a 2-core machine
    python bench/train.py --quick

Prints one table of ratios measured side by side in this one run:
- checkpoint save GB/s (the engine's real save: DeepSpeed shards + fsync + barrier + commit
  marker, ViT-S/16 under ZeRO-2 on 2 CPU ranks) / `dd conv=fsync` GB/s writing the same number
  of bytes into the same directory; saves and dd runs alternate, each starting after `sync` and
  3 s of quiet (a VM disk slows a write that follows another), medians. Goal >= 0.8.
- the per-file CRC-32 of that save: saves with and without it alternate in the same run (without
  = the checksum function replaced by a no-op), medians of the save times; goal < 5 % more. Also
  the resume-time verification: both ranks checksum their own files in parallel, GB/s.
- training blocked by a background save (checkpoint.async_save: snapshot to host memory, then
  write, flush, checksum and commit in a thread) / by a synchronous save of the same state: the two
  alternate in the same run, each after `sync` and 3 s of quiet, medians; goal <= 0.10. Also the
  step time while the background write runs / without it (2 ranks and 2 writer threads share the
  cores here; on a GPU node the steps run on the GPUs).
- MLflow logging time per step / step time (a real tracker against a local `mlflow server`, 5
  metrics logged every step, bench/tracking.py). Goal < 1 %.
- tiny-ViT (configs/smoke.yaml) optimizer steps/s with 2 CPU ranks (torchrun, gloo, ZeRO-2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc: int) -> list[str]:
    """torchrun with ``nproc`` local ranks on a free loopback port; the program and its arguments follow."""
    from pipeline.tracking.server import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip


def _train(nproc: int, config: str | None, overrides: list[str]) -> str:
    cmd = [*torchrun(nproc), "-m", "pipeline.train"]
    cmd += ["--config", config] if config else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(cmd + overrides, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def write_shards(out: Path) -> None:
    cmd = [sys.executable, "-m", "pipeline.data", "write", "--out", str(out), "--synthetic", "1200",
           "--classes", "10", "--size", "32"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)


def checkpoint_bandwidth(shards: Path, work: Path, saves: int) -> dict[str, float]:
    """Median save GB/s (with checksums), median dd GB/s, GB per checkpoint, median save seconds
    with and without checksums, and the resume-time verification GB/s: saves and dd runs alternate.

    The disk of a shared VM changes speed from minute to minute, so each engine save is paired
    with a `dd conv=fsync` of the same size into the same directory right after it.
    """
    cmd = [*torchrun(2), __file__, "--ckpt-worker", str(shards), str(work / "ckpt"), str(saves)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    rows = [json.loads(line[len("CKPT ") :]) for line in proc.stdout.splitlines() if line.startswith("CKPT ")]
    if proc.returncode != 0 or not rows:
        sys.exit(f"checkpoint benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    verify = next(json.loads(ln[len("VERIFY ") :]) for ln in proc.stdout.splitlines() if ln.startswith("VERIFY "))
    background = [json.loads(ln[len("ASYNC ") :]) for ln in proc.stdout.splitlines() if ln.startswith("ASYNC ")]
    print("background saves (the first allocates the host buffers):", *background, sep="\n  ")
    rows, background = rows[1:], background[1:]  # the first save also pays for first-touch allocations
    ckpt = [r["gb"] / r["save_s"] for r in rows if r["checksums"]]
    dd = [r["dd_gb_s"] for r in rows]
    print("save GB/s:", " ".join(f"{v:.2f}" for v in ckpt), "| dd GB/s:", " ".join(f"{v:.2f}" for v in dd))
    with_s = [r["save_s"] for r in rows if r["checksums"]]
    without_s = [r["save_s"] for r in rows if not r["checksums"]]
    print("save s with CRC-32:", " ".join(f"{v:.3f}" for v in with_s), "| without:",
          " ".join(f"{v:.3f}" for v in without_s))  # fmt: skip
    return {
        "ckpt_gb_s": statistics.median(ckpt), "dd_gb_s": statistics.median(dd), "gb": rows[-1]["gb"],
        "save_s_crc": statistics.median(with_s), "save_s_plain": statistics.median(without_s),
        "verify_gb_s": verify["gb"] / verify["seconds"],
        **{k: statistics.median(b[k] for b in background) for k in background[0]},
    }  # fmt: skip


def dd_bandwidth(directory: Path, gb: float) -> float:
    """GB/s of `dd conv=fsync` writing ``gb`` into ``directory``."""
    block = 16 * 2**20
    target = directory / "dd.bin"
    cmd = [
        "dd",
        "if=/dev/zero",
        f"of={target}",
        f"bs={block}",
        f"count={max(1, round(gb * 1e9 / block))}",
        "conv=fsync",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    target.unlink()
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", proc.stderr)
    return int(m.group(1)) / float(m.group(2)) / 1e9


def settle(seconds: float = 3.0) -> None:
    """Start each timed write from a quiet disk: a write that follows another one on a VM disk waits
    for the first one's write-back, which would penalise whichever side happens to go second."""
    import time

    os.sync()
    time.sleep(seconds)


def ckpt_worker(shards: str, run_dir: str, saves: int) -> None:
    """One rank of the checkpoint benchmark: the engine's real save path (build_run + save_checkpoint)."""
    import time

    import torch.distributed as dist

    from pipeline.artifacts import checkpoints as ckpt
    from pipeline.artifacts.checkpoints import verify
    from pipeline.config import load_config
    from pipeline.train.dist_env import detect
    from pipeline.train.lifecycle import build_run
    from pipeline.train.loop import _step
    from pipeline.train.saving import save_checkpoint
    from pipeline.train.stage import pretraining

    cfg = load_config(None, [
        f"data.path={shards}", f"train.run_dir={run_dir}", "model.preset=S/16", "model.image_size=32",
        "model.patch_size=16", "train.micro_batch_size=8", f"checkpoint.keep_last={saves}", "tracking.enabled=false",
        "data.num_workers=0",
    ])  # fmt: skip
    r = build_run(cfg, detect(), [], pretraining(cfg))
    _step(r, iter(r.train_loader))  # creates the AdamW moments, so the checkpoint has its full size
    crc32, crc_tag = ckpt.file_checksum, None
    for i in range(saves):
        r.state.step = i + 1
        checksums = i % 2 == 1  # saves without and with checksums alternate (the first, dropped, without)
        ckpt.file_checksum = crc32 if checksums else (lambda path: "-")
        if r.env.rank == 0:
            settle()
        dist.barrier()
        t0 = time.perf_counter()
        tag_dir = save_checkpoint(r)
        save_s = time.perf_counter() - t0
        crc_tag = tag_dir if checksums else crc_tag
        if r.env.rank == 0:
            gb = sum(verify(tag_dir)["files"].values()) / 1e9  # also proves the save complete
            settle()
            row = {"gb": gb, "save_s": save_s, "checksums": checksums, "dd_gb_s": dd_bandwidth(Path(run_dir), gb)}
            print("CKPT " + json.dumps(row))
        dist.barrier()
    ckpt.file_checksum = crc32
    _bench_verify(r, crc_tag)
    _bench_background(r, pairs=max(2, saves // 2), first_step=saves + 1)
    dist.destroy_process_group()


def _bench_background(r: Any, *, pairs: int, first_step: int) -> None:
    """Synchronous and background saves of the same state, alternating; what each blocks training for,
    and the time of 3 training steps while the background write runs / 3 steps after it."""
    import time

    import torch.distributed as dist

    from pipeline.train.loop import _step
    from pipeline.train.saving import BackgroundSaves, save_checkpoint

    background, data = BackgroundSaves(), iter(r.train_loader)

    def steps() -> float:
        t0 = time.perf_counter()
        for _ in range(3):
            _step(r, data)
        return time.perf_counter() - t0

    r.state.step = first_step
    for _ in range(pairs):
        row: dict[str, float] = {}
        for mode in ("sync", "background"):
            r.state.step += 1
            if r.env.rank == 0:
                settle()
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "sync":
                save_checkpoint(r)
                row["sync_s"] = time.perf_counter() - t0
                continue
            background.start(r)
            row["blocked_s"] = time.perf_counter() - t0
            row["steps_during_s"] = steps()
            row["total_s"] = background.wait().seconds
            row["steps_after_s"] = steps()
        if r.env.rank == 0:
            print("ASYNC " + json.dumps(row))


def _bench_verify(r: Any, tag_dir: Path) -> None:
    """The resume-time check of the newest checkpoint (with checksums): every rank its own files."""
    import time

    import torch.distributed as dist

    from pipeline.artifacts import checkpoints as ckpt
    from pipeline.train import engine as ds

    os.sync()
    dist.barrier()
    t0 = time.perf_counter()
    marker, problems = ckpt.check_tag(tag_dir, rank=r.env.rank, world_size=r.env.world_size,
                                      agree=ds.union_across_ranks, max_bytes=None)  # fmt: skip
    seconds = time.perf_counter() - t0
    assert marker is not None, problems
    if r.env.rank == 0:
        print("VERIFY " + json.dumps({"gb": sum(marker["files"].values()) / 1e9, "seconds": seconds}))


def steps_per_second(shards: Path, work: Path, steps: int) -> float:
    run_dir = work / "tiny"
    _train(2, "configs/smoke.yaml", [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1",
        "tracking.enabled=false", "checkpoint.every_steps=0", "checkpoint.export_final=false",
    ])  # fmt: skip
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            times[record["step"]] = record["time"]
    first, last = 10, max(times)  # skip the warm-up steps
    return (last - first) / (times[last] - times[first])


def mlflow_overhead(steps: int) -> dict[str, float]:
    """bench/tracking.py against a real local `mlflow server` (what jobs on a cluster talk to)."""
    from tracking import run  # bench/tracking.py, beside this file

    from pipeline.tracking.server import ServerSpec, free_port, start_server, stop_server

    with tempfile.TemporaryDirectory() as root:
        spec = ServerSpec(root=Path(root), port=free_port())
        proc = start_server(spec)
        try:
            return run(steps, spec.url)
        finally:
            stop_server(proc.pid)


def main() -> None:
    if sys.argv[1:2] == ["--ckpt-worker"]:
        ckpt_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer saves, steps and repetitions")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under runs/)")
    args = parser.parse_args()
    saves, steps = (5, 40) if args.quick else (9, 120)  # odd: after the dropped first, as many with as without
    (REPO / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or REPO / "runs", prefix="bench-") as tmp:
        work = Path(tmp)
        write_shards(work / "shards")
        c = checkpoint_bandwidth(work / "shards", work, saves)
        ckpt_rate, dd_rate, ckpt_gb = c["ckpt_gb_s"], c["dd_gb_s"], c["gb"]
        sps = steps_per_second(work / "shards", work, steps)
    overhead = mlflow_overhead(200 if args.quick else 500)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"checkpoint: ViT-S/16, ZeRO-2, 2 CPU ranks, {ckpt_gb:.3f} GB per save; {saves - 1} saves, each followed by dd"
    )
    crc_extra = 100 * (c["save_s_crc"] / c["save_s_plain"] - 1)
    rows = [
        (
            "checkpoint save GB/s / dd conv=fsync GB/s",
            f"{ckpt_rate:.2f} / {dd_rate:.2f} = {ckpt_rate / dd_rate:.2f}",
            ">= 0.8",
        ),
        (
            "save time with CRC-32 / without (same run)",
            f"{c['save_s_crc']:.3f} / {c['save_s_plain']:.3f} s = {crc_extra:+.1f} %",
            "< 5 %",
        ),
        ("resume checksum verification, 2 ranks in parallel", f"{c['verify_gb_s']:.2f} GB/s", "-"),
        (
            "training blocked: background save / synchronous save",
            f"{c['blocked_s']:.3f} / {c['sync_s']:.3f} s = {c['blocked_s'] / c['sync_s']:.3f}",
            "<= 0.10",
        ),
        (
            "3 steps during the background write / after it",
            f"{c['steps_during_s']:.3f} / {c['steps_after_s']:.3f} s = {c['steps_during_s'] / c['steps_after_s']:.2f}",
            "-",
        ),
        ("background save, snapshot to commit", f"{c['total_s']:.3f} s", "-"),
        ("MLflow log time per step / step time", f"{overhead['log_over_step_pct']:.3f} %", "< 1 %"),
        ("tiny ViT steps/s, 2 CPU ranks (smoke.yaml)", f"{sps:.1f}", "-"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'result':<24}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:<24}  {goal}")
    print(json.dumps({**c, "mlflow": overhead, "steps_per_s": sps}))


if __name__ == "__main__":
    main()
