"""The same 2 smoke ranks on SLURM (2 nodes x 1 rank) with the old thread rule, with threads from
the allocation, and as local processes: img/s and start-up, side by side.

    tests/slurm/start_local_slurm.sh && export SLURM_CONF=/tmp/pipeline-slurm/etc/slurm.conf
    python bench/slurm_cpus.py --reps 2 --steps 200
    tests/slurm/stop_local_slurm.sh

Each repetition runs the three variants in turn (A, B, C, A, B, C, ...), so a change in machine
load hits all of them. "old rule" sets ``train.cpu_threads`` to what the rank took before
(``os.cpu_count() // ranks per node``: 2 on the 2-core test host). img/s: median over the logged
windows after the first (``train/img_per_s`` in metrics.jsonl, ``train.log_every`` steps each).
Start-up: from the launcher's start to the first logged step, less that first window's training
time (its images / the run's median img/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "SLURM, old rule (torch threads = cpu_count // ranks per node)": ["train.cpu_threads=%d"],
    "SLURM, threads from the allocation": [],
    "--local (2 processes)": ["--local"],
}


def _run(data: Path, run_dir: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    log_every = max(1, steps // 5)
    cmd = [sys.executable, "launch/submit.py", "--config", "configs/smoke.yaml", "--nodes", "2",
           "--run-dir", str(run_dir), f"data.path={data}", "model.num_classes=4", "launch.ranks_per_node=1",
           f"train.steps={steps}", f"train.log_every={log_every}", "checkpoint.every_steps=0",
           "tracking.system_metrics=false", "--follow", *extra]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "train/img_per_s" in r]
    img_s = statistics.median(r["train/img_per_s"] for r in train[1:])
    first_window_s = log_every * 32 / img_s  # global batch 32 (16 per rank x 2)
    return img_s, train[0]["time"] - t0 - first_window_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    old_threads = os.cpu_count() or 1  # the old rule: cpu_count() // 1 rank per (fake) node
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write = ["write", "--out", str(data), "--synthetic", "2000", "--classes", "4", "--size", "32"]
        subprocess.run([sys.executable, "-m", "pipeline.data", *write], cwd=REPO, check=True, capture_output=True)
        for rep in range(a.reps):
            for i, (name, extra) in enumerate(VARIANTS.items()):
                extra = [x % old_threads if "%d" in x else x for x in extra]
                results[name].append(_run(data, Path(tmp) / f"r{rep}-{i}", a.steps, extra))
                print(f"rep {rep}: {name}: {results[name][-1][0]:.0f} img/s, start-up {results[name][-1][1]:.1f} s")
    print(f"\n| variant ({a.steps} steps, {a.reps} reps) | img/s per rep | start-up s per rep |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {' / '.join(f'{r[0]:.0f}' for r in runs)} | {' / '.join(f'{r[1]:.1f}' for r in runs)} |")


if __name__ == "__main__":
    main()
