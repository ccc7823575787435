"""Tracking overhead: MLflow logging time per step / step time (goal: under 1%).

    python bench/tracking.py                      # a temporary local MLflow server
    python bench/tracking.py --uri http://host:5000 --steps 500

Runs a small CPU training loop (a torch MLP) twice, without and with a tracker logging five
metrics every step (the worst case: the engine logs every ``train.log_every`` steps), and prints
one JSON line: the time spent inside ``log_metrics`` per step, the step time, their ratio, and
the wall-clock difference of the two loops (which also counts the delivery thread's share of the
CPU; noisy on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline import metric_names as mn
from pipeline.config import TrackingConfig
from pipeline.tracking.server import ServerSpec, free_port, start_server, stop_server
from pipeline.tracking.tracker import Tracker, open_tracker


def _loop(steps: int, tracker: Tracker | None) -> tuple[float, float]:
    """(wall seconds, seconds inside log_metrics) of ``steps`` training steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
    in_log = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)  # (B, 10) logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tracker is not None:
            metrics = {mn.TRAIN_LOSS: loss.item(), mn.TRAIN_LR: 1e-3, mn.TRAIN_IMG_PER_S: 1.0, mn.TRAIN_MFU: 0.1}
            t = time.perf_counter()
            tracker.log_metrics({**metrics, mn.TRAIN_STEP_TIME_S: 0.0}, step)
            in_log += time.perf_counter() - t
    return time.perf_counter() - start, in_log


def run(steps: int, uri: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        _loop(20, None)  # warm-up
        before, _ = _loop(steps, None)
        cfg = TrackingConfig(uri=uri, system_metrics=True)
        tracker = open_tracker(cfg, run_dir=Path(tmp) / "bench", experiment="bench", run_name="tracking-overhead")
        wall, in_log = _loop(steps, tracker)
        t = time.perf_counter()
        tracker.close()
        close_s = time.perf_counter() - t
        after, _ = _loop(steps, None)
    base_wall = (before + after) / 2  # the baseline on both sides of the tracked loop: load drifts
    step_s = base_wall / steps
    return {
        "steps": steps,
        "step_ms": round(step_s * 1e3, 3),
        "log_ms_per_step": round(in_log / steps * 1e3, 4),
        "log_over_step_pct": round(100 * in_log / steps / step_s, 4),
        "wall_overhead_pct": round(100 * (wall - base_wall) / base_wall, 2),
        "baseline_spread_pct": round(100 * abs(before - after) / base_wall, 2),
        "close_s": round(close_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--uri", default="", help="a tracking URI; default: start a temporary local server")
    args = p.parse_args()
    if args.uri:
        print(json.dumps({"uri": args.uri, **run(args.steps, args.uri)}))
        return
    with tempfile.TemporaryDirectory() as root:
        spec = ServerSpec(root=Path(root), port=free_port())
        proc = start_server(spec)
        try:
            print(json.dumps({"uri": "local mlflow server (--workers 1)", **run(args.steps, spec.url)}))
        finally:
            stop_server(proc.pid)


if __name__ == "__main__":
    main()
