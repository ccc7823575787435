"""One GPU benchmark (issue 17): model speed, the loader, the real engine and checkpoint bandwidth, one table.

    python bench/gpu.py                                  # one H100/H200: < 8 minutes, table in runs/gpu_bench.md
    python bench/gpu.py --device cpu --smoke --out T.md  # every code path at tiny sizes, on CPU (the test runs it)

Rows:
* ViT-B/16 training step (random images on the device, bf16 autocast, fused AdamW; bench/accel.py):
  img/s, MFU and peak memory at the largest batch that fits (doubling until CUDA runs out of memory,
  capped by --max-batch), eager and torch.compile, gradient checkpointing off and on;
* ViT-L/16 compiled, the same;
* the loader (build_loader on shards of 500x375 JPEGs, ImageNet's typical size, written by the
  project's writer): data.decoder=pil with N workers (and per worker, i.e. per core), and
  data.decoder=nvjpeg where CUDA is there;
* a training run through the real entry point (torchrun, 1 rank, `python -m pipeline.train` with
  configs/pretrain/vit_b16.yaml: bf16, ZeRO-1) on those shards: img/s, MFU and the fraction of time
  spent waiting for data, from the run's metrics.jsonl (the first log window, start-up, left out);
* that run's final checkpoint save (the engine's own log line: DeepSpeed shards, fsync, checksums,
  commit) in GB/s against `dd conv=fsync` of the same bytes into the same directory.

Built for a lent GPU with little time: every row runs in its own try/except (an error is written in
its row and the next row runs), a global budget (--budget-s) stops rows that would start too late
and cuts a row that runs past it, and the table file (--out) is rewritten after every row, so a
killed run still leaves its finished rows. Rows run in order of importance, not in table order.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accel import free, largest_batch, peak_flops, sync, throughput  # bench/accel.py, beside this file
from data import photo  # bench/data.py
from train import dd_bandwidth, settle, torchrun  # bench/train.py

from pipeline.config.schema import DataConfig
from pipeline.data import build_loader
from pipeline.data.sources import encode
from pipeline.data.writer import Item, write_samples
from pipeline.model import ViT, forward_macs, vit_preset
from pipeline.train.metrics_log import read_metrics_log

REPO = Path(__file__).resolve().parent.parent
B16_RECIPE = "configs/pretrain/vit_b16.yaml"


@dataclass
class Row:
    key: str
    measurement: str
    batch: str = "-"
    img_s: str = "-"
    mfu: str = "-"
    mem_gib: str = "-"
    other: str = ""
    status: str = "not run"


ROWS = [
    Row("b16-eager", "ViT-B/16 bf16 train step, eager"),
    Row("b16-compiled", "ViT-B/16 bf16 train step, torch.compile"),
    Row("b16-eager-ckpt", "ViT-B/16 bf16 train step, eager, gradient checkpointing"),
    Row("b16-compiled-ckpt", "ViT-B/16 bf16 train step, torch.compile, gradient checkpointing"),
    Row("l16-compiled", "ViT-L/16 bf16 train step, torch.compile"),
    Row("loader-pil", "loader of one rank (per GPU), data.decoder=pil (CPU decode), 500x375 JPEGs"),
    Row("loader-nvjpeg", "loader of one rank (per GPU), data.decoder=nvjpeg (GPU decode), 500x375 JPEGs"),
    Row("train-engine", "python -m pipeline.train, 1 rank, bf16, ZeRO-1, ViT-B/16"),
    Row("ckpt-save", "checkpoint save (engine) vs dd conv=fsync, same disk"),
]
# Most wanted first: when the budget runs out, the rows left are the ones the issue can wait for.
RUN_ORDER = ("b16-eager", "b16-compiled", "train-engine", "ckpt-save", "loader-pil", "loader-nvjpeg",
             "b16-eager-ckpt", "b16-compiled-ckpt", "l16-compiled")  # fmt: skip
COLUMNS = ("row", "measurement", "batch", "img/s", "MFU", "peak mem GiB", "other", "status")


class Skip(Exception):
    """The row cannot run here (no CUDA, the decoder is not in this checkout): its status says why."""


class OutOfTime(BaseException):
    """The global budget ran out while the row ran. A BaseException, like KeyboardInterrupt: library
    code that catches Exception (inductor falls back on errors) must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise OutOfTime in this (main) thread after ``seconds``: a row cannot run past the budget."""

    def expire(*_: object) -> None:
        raise OutOfTime

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Bench:
    """The rows, the budget, the table file, and what rows hand on to later rows (batches, shards, the run)."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.device = torch.device(args.device)
        self.rows = {r.key: Row(**{f.name: getattr(r, f.name) for f in fields(r)}) for r in ROWS}
        self.start = time.monotonic()
        self.finished = False
        self.shared: dict[str, object] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def run(self, key: str, fn: Callable[[Bench, Row], None]) -> None:
        row, left = self.rows[key], self.left()
        if left < self.args.min_row_s:
            row.status = f"skipped: budget ({left:.0f} s left of {self.args.budget_s:.0f} s)"
            return self.write()
        t0 = time.monotonic()
        try:
            with deadline(left):
                fn(self, row)
            row.status = f"ok ({time.monotonic() - t0:.0f} s)"
        except Skip as e:
            row.status = str(e)
        except OutOfTime:
            row.status = f"stopped: budget reached after {time.monotonic() - t0:.0f} s"
        except Exception as e:  # one broken row must not cost the others
            traceback.print_exc()
            row.status = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        finally:
            free()
        print(f"[gpu.py] {key}: {row.status}", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        """Rewrite the whole table file (header with the wall time so far, every row)."""
        text = "\n".join([*header(self), "", *table(self.rows.values())]) + "\n"
        tmp = self.args.out.with_name(f".{self.args.out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.args.out)  # a reader (or a kill) never sees half a table


def header(b: Bench) -> list[str]:
    a, dev = b.args, b.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (CPU run)"
    peak = peak_flops(dev, a.peak_tflops)
    wall = time.monotonic() - b.start
    return [
        f"# bench/gpu.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- device: {dev.type}, GPU: {gpu}; {os.cpu_count()} CPUs visible; {platform.node()}",
        f"- torch {torch.__version__}, deepspeed {_version('deepspeed')}, Python {platform.python_version()}",
        "- MFU: model FLOPs (3 x forward, 2 per MAC; recompute not credited) / "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16 peak (--peak-tflops)" if peak else "no known peak (-)"),
        f"- wall time: {wall:.0f} s {'in all' if b.finished else 'so far (running)'}; budget {a.budget_s:.0f} s"
        + (" (--smoke: tiny sizes, the numbers test the code paths only)" if a.smoke else ""),
        f"- command: python bench/gpu.py {' '.join(sys.argv[1:])}",
    ]


def table(rows: object) -> list[str]:
    def cell(v: str) -> str:
        return " ".join(str(v).split()).replace("|", "\\|")

    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(cell(getattr(r, f.name)) for f in fields(r)) + " |")
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---- model rows ---------------------------------------------------------------------------------


def make_model(b: Bench, preset: str, ckpt: bool) -> ViT:
    torch.manual_seed(0)
    if b.args.smoke:  # a tiny ViT stands in for every preset: the code path, not the speed
        model = vit_preset("Ti/16", image_size=32, patch_size=8, depth=2, num_classes=10)
    else:
        model = vit_preset(preset)
    model = model.to(b.device).train()
    model.set_grad_checkpointing(ckpt)
    return model


def vit_row(preset: str, *, compiled: bool, ckpt: bool) -> Callable[[Bench, Row], None]:
    """A row: the largest batch that fits (searched eagerly once per preset and checkpointing, and
    shared by the compiled row), then img/s, MFU and peak memory of the step."""

    def go(b: Bench, row: Row) -> None:
        a = b.args
        model = make_model(b, preset, ckpt)
        key = f"batch {preset} {ckpt}"
        found = b.shared.get(key) or largest_batch(model, b.device, a.start_batch, a.max_batch)
        b.shared[key] = found
        runner = torch.compile(model, backend=a.compile_backend) if compiled else model
        try:
            batch, img_s, mem = _measure(b, runner, found)
        finally:
            if compiled:
                torch.compiler.reset()  # drop the compiled graphs (and their memory) before the next row
        peak = peak_flops(b.device, a.peak_tflops)
        row.batch, row.img_s, row.mem_gib = str(batch), f"{img_s:.1f}", mem
        row.mfu = f"{6 * forward_macs(model) * img_s / peak:.1%}" if peak else "-"
        row.other = f"largest batch that fits eagerly, doubling {a.start_batch}..{a.max_batch}" + (
            f"; compiled OOM at {found}, ran {batch}" if batch != found else ""
        )
        if a.smoke:
            row.other += "; tiny ViT (--smoke)"

    return go


def _measure(b: Bench, model: torch.nn.Module, batch: int) -> tuple[int, float, str]:
    """(batch, img/s, peak GiB); a compiled model that needs more memory than eager halves the batch."""
    while True:
        if b.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.device)
        try:
            img_s = throughput(model, batch, b.device, b.args.reps, steps=b.args.steps)
        except torch.OutOfMemoryError:
            free()
            if batch // 2 < b.args.start_batch:
                raise
            batch //= 2
            continue
        mem = f"{torch.cuda.max_memory_allocated(b.device) / 2**30:.1f}" if b.device.type == "cuda" else "-"
        return batch, img_s, mem


# ---- data: shards of ImageNet-size JPEGs, the loader rows ---------------------------------------


def shards(b: Bench) -> Path:
    """Shards of 500x375 photo-like JPEGs (bench/data.py's), written once by the project's writer.

    A pool of distinct images is repeated under new keys: decoding costs the same, and drawing
    thousands of photos would eat the budget."""
    root = b.work / "shards"
    if "shards" in b.shared:
        return root
    a = b.args
    pool = [encode(photo(i, 375, 500), "jpg", 90) for i in range(a.distinct_images)]
    jpegs = [pool[i % len(pool)] for i in range(a.images)]
    items = [Item(f"p{i:07d}", i % 10, lambda d=d: (d, "jpg")) for i, d in enumerate(jpegs)]
    write_samples(root, items, classes=[str(c) for c in range(10)], source={"kind": "bench"}, image_size=None,
                  val_frac=a.val_frac)  # fmt: skip
    b.shared["shards"] = sum(map(len, pool)) / len(pool) / 1024
    return root


def loader_rate(b: Bench, decoder: str, workers: int) -> float:
    """Images/s of build_loader after a warm-up (worker start, shuffle buffers), for --loader-s seconds."""
    a, root = b.args, shards(b)
    cfg = DataConfig(path=str(root), num_workers=workers, decoder=decoder)  # type: ignore[arg-type]
    size = (a.image_size, a.image_size)
    with build_loader(cfg, rank=0, world_size=1, batch_size=a.batch, image_size=size, seed=0,
                      pin_memory=b.device.type == "cuda") as loader:  # fmt: skip
        it, t0, batches = iter(loader), time.perf_counter(), 0
        while batches < 2 or time.perf_counter() - t0 < a.loader_warmup_s:
            images = next(it)[0]
            batches += 1
        if not (torch.is_tensor(images) and images.dim() == 4):
            raise Skip(f"not measured: the loader yields {type(images).__name__}, not a (B, C, H, W) batch")
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.loader_s:
            images = next(it)[0]
            if images.is_cuda:
                sync(images.device)
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def loader_pil(b: Bench, row: Row) -> None:
    w = b.args.workers
    rate = loader_rate(b, "pil", w)
    row.batch, row.img_s = str(b.args.batch), f"{rate:.1f}"
    row.other = (f"{w} workers: {rate / w:.1f} img/s per worker (one core each); crop {b.args.image_size}, "
                 f"JPEG {b.shared['shards']:.0f} KB")  # fmt: skip


def loader_nvjpeg(b: Bench, row: Row) -> None:
    if b.device.type != "cuda" or not torch.cuda.is_available():
        raise Skip("skipped: no CUDA (nvJPEG decodes on the GPU)")
    w = b.args.workers
    rate = loader_rate(b, "nvjpeg", w)
    row.batch, row.img_s = str(b.args.batch), f"{rate:.1f}"
    row.other = f"{w} workers read bytes, the GPU decodes and crops"


# ---- the real engine: one training run, its checkpoint save ------------------------------------


def train_engine(b: Bench, row: Row) -> None:
    a, root = b.args, shards(b)
    run_dir = b.work / "run"
    log = b.work / "train.log"
    b.shared["train-log"] = log
    proc = _torchrun(b, _train_overrides(b, root, run_dir), log)
    if proc != 0:
        tail = " ".join(log.read_text(errors="replace").splitlines()[-8:])
        raise RuntimeError(f"training exited {proc}: ...{tail[-400:]}")
    windows = [r for r in read_metrics_log(run_dir) if "train/img_per_s" in r]
    steady = windows[1:] or windows  # the first window holds start-up: workers, buffers, compilation
    img_s = statistics.median(r["train/img_per_s"] for r in steady)
    wait = statistics.fmean(r["data/wait_frac"] for r in steady)
    mfus = [r["train/mfu"] for r in steady if "train/mfu" in r]
    row.batch, row.img_s = str(a.train_batch), f"{img_s:.1f}"
    row.mfu = f"{statistics.median(mfus):.1%}" if mfus else "-"
    steps = f"{steady[0]['step'] - a.log_every + 1}-{steady[-1]['step']}" if len(windows) > 1 else "all"
    row.other = (f"data wait {wait:.1%} of the time; {a.train_steps} steps, steps {steps} counted; "
                 f"{a.workers} workers, data.decoder={a.train_decoder}"
                 + (", train.compile" if a.train_compile else "")
                 + ("; configs/smoke.yaml's tiny ViT (--smoke)" if a.smoke else ""))  # fmt: skip
    b.shared["run_dir"] = run_dir


def _train_overrides(b: Bench, root: Path, run_dir: Path) -> list[str]:
    a = b.args
    if a.smoke:  # configs/smoke.yaml's tiny ViT at 32 px, one CPU rank
        base = ["--config", "configs/smoke.yaml", "train.device=cpu", "launch.nodes=1", "launch.ranks_per_node=1"]
    else:  # the real recipe, its 8 x 8 GPUs cut down to this one
        base = ["--config", B16_RECIPE, "train.device=cuda", "launch.nodes=1", "launch.gpus_per_node=1"]
    peak = [f"train.peak_tflops={a.peak_tflops}"] if a.peak_tflops else []
    return base + peak + [
        f"data.path={root}", f"train.run_dir={run_dir}", f"data.num_workers={a.workers}",
        f"data.decoder={a.train_decoder}", "train.precision=bf16", "train.zero_stage=1",
        f"train.steps={a.train_steps}", f"train.micro_batch_size={a.train_batch}", "train.global_batch_size=0",
        "train.grad_accum=1", f"train.log_every={a.log_every}", "train.eval_every=0",
        f"train.compile={str(a.train_compile).lower()}", "tracking.enabled=false", "checkpoint.every_steps=0",
        "checkpoint.export_final=false",
    ]  # fmt: skip


def _torchrun(b: Bench, argv: list[str], log: Path) -> int:
    """The project's entry point under torchrun (1 rank), killed as a group when the budget ends."""
    cmd = [*torchrun(1), "-m", "pipeline.train", *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "MLFLOW_TRACKING_URI")}  # fmt: skip
    env.update(PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(b.left(), 1))
        except BaseException:  # the budget's alarm or the timeout: no rank may outlive the benchmark
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


SAVE_LINE = re.compile(r"checkpoint \S+ committed: ([\d.]+) GB in ([\d.]+) s")


def ckpt_save(b: Bench, row: Row) -> None:
    """The training run's final save, as the engine logged it, then dd of the same bytes beside it."""
    if "run_dir" not in b.shared:
        raise Skip("skipped: needs the train-engine row's run (its final save), which did not finish")
    saves = SAVE_LINE.findall(Path(b.shared["train-log"]).read_text(errors="replace"))  # type: ignore[arg-type]
    if not saves:
        raise RuntimeError("the training log has no 'checkpoint ... committed' line")
    gb, seconds = map(float, saves[-1])
    settle(
        0.5 if b.args.smoke else 3.0
    )  # dd starts from a quiet disk, as the save did not (bench/train.py says why it matters)
    dd = dd_bandwidth(Path(b.shared["run_dir"]), gb)  # type: ignore[arg-type]
    save = gb / seconds
    row.other = (f"save {save:.2f} GB/s ({gb:.3f} GB in {seconds:.2f} s, 1 rank, ZeRO-1) / dd conv=fsync "
                 f"{dd:.2f} GB/s = {save / dd:.2f}")  # fmt: skip


SECTIONS: dict[str, Callable[[Bench, Row], None]] = {
    "b16-eager": vit_row("B/16", compiled=False, ckpt=False),
    "b16-compiled": vit_row("B/16", compiled=True, ckpt=False),
    "b16-eager-ckpt": vit_row("B/16", compiled=False, ckpt=True),
    "b16-compiled-ckpt": vit_row("B/16", compiled=True, ckpt=True),
    "l16-compiled": vit_row("L/16", compiled=True, ckpt=False),
    "loader-pil": loader_pil,
    "loader-nvjpeg": loader_nvjpeg,
    "train-engine": train_engine,
    "ckpt-save": ckpt_save,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_bench.md", help="the table (markdown)")
    p.add_argument("--budget-s", type=float, default=420.0, help="no row starts or runs past this (seconds)")
    p.add_argument("--min-row-s", type=float, default=20.0, help="a row needs this much budget left to start")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes everywhere: tests the code paths")
    p.add_argument("--rows", default=",".join(RUN_ORDER), help="rows to run, comma-separated (run order)")
    p.add_argument("--dir", type=Path, default=None, help="where shards and the run go (default: under runs/)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak per GPU for MFU (default: the data sheet's, 989 for H100 SXM/H200)",
    )
    p.add_argument("--start-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=1024, help="cap of the batch search")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--steps", type=int, default=3, help="train steps per timed repetition")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the model rows (default inductor; eager with --smoke)",
    )
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    # 8 workers x 256 per batch: ~1,000 samples per worker and epoch, several batches each
    p.add_argument("--images", type=int, default=8192, help="samples in the shards")
    p.add_argument("--distinct-images", type=int, default=64, help="distinct JPEGs among them")
    p.add_argument("--val-frac", type=float, default=0.02)
    p.add_argument("--image-size", type=int, default=224, help="crop side of the loader rows")
    p.add_argument("--batch", type=int, default=256, help="batch of the loader rows")
    p.add_argument("--loader-s", type=float, default=10.0, help="seconds timed per loader row")
    p.add_argument("--loader-warmup-s", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=256, help="train.micro_batch_size of the engine run")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--train-decoder", default="pil", help="data.decoder of the engine run")
    p.add_argument("--train-compile", action="store_true", help="train.compile=true in the engine run")
    a = p.parse_args(argv)
    # --smoke: the same torch.compile call, traced by dynamo without inductor's C++ build (tens of
    # seconds per graph on 2 cores); inductor on CPU is covered by the train.compile tests
    a.compile_backend = a.compile_backend or ("eager" if a.smoke else "inductor")
    unknown = sorted(set(a.rows.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(RUN_ORDER)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible: run on a GPU node, or --device cpu --smoke")
    if a.smoke:
        a.start_batch, a.max_batch, a.reps, a.steps = 4, 16, 2, 2
        a.workers, a.images, a.distinct_images, a.image_size, a.batch = 1, 96, 4, 32, 8
        a.loader_s, a.loader_warmup_s, a.train_steps, a.train_batch, a.log_every = 1.0, 0.0, 12, 8, 4
        a.min_row_s = min(a.min_row_s, 1.0)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    parent = a.dir or REPO / "runs"  # shards, the run and dd's file: all on the disk being measured
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=parent))
    if a.smoke:  # tiny ops on 2 threads of a busy machine mostly wait for each other (10-50x slower)
        torch.set_num_threads(1)
    b = Bench(a, work)
    b.write()
    try:
        for key in a.rows.split(","):
            b.run(key, SECTIONS[key])
    finally:
        b.finished = True
        b.write()
        shutil.rmtree(work, ignore_errors=True)
    print(a.out.read_text())


if __name__ == "__main__":
    main()
