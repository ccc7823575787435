"""Which start fine-tunes best (issue 18's evidence): the digits fine-tune of the demo, same budget and
seed, from three starting points:

1. random init (no pretraining),
2. the supervised pretrain on the demo's synthetic shards (what `make demo` runs),
3. an MAE pretrain on the same synthetic images indexed without their labels (--unlabeled).

Every run goes through the launcher a user runs (`launch/submit.py --local --follow`), on 2 CPU ranks.
Runs live under runs/bench_starts/ (kept: a rerun resumes or skips finished runs; --fresh starts over).

    python bench/finetune_starts.py [--fresh] [--finetune-steps 600] [--pretrain-steps 200]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.metric_names import EVAL_TOP1  # noqa: E402
from pipeline.train.metrics_log import read_metrics_log  # noqa: E402

OUT = REPO / "runs" / "bench_starts"
SYNTHETIC, DIGITS = OUT / "data" / "synthetic", OUT / "data" / "digits"
UNLABELED = OUT / "data" / "synthetic_unlabeled.json"
DIGITS_FT = REPO / "configs" / "finetune" / "digits.yaml"
MAE_FT = REPO / "configs" / "finetune" / "mae_tiny.yaml"


def sh(cmd: list[str]) -> float:
    print(f"$ {' '.join(map(str, cmd))}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"bench: exit {proc.returncode} from: {' '.join(map(str, cmd))}")
    return time.perf_counter() - t0


def submit(config: Path | None, run_dir: Path, *overrides: str) -> float:
    cfg = ["--config", config] if config else []
    common = [f"train.run_dir={run_dir}", "tracking.experiment=bench_starts", "train.seed=0"]
    return sh([sys.executable, "launch/submit.py", *cfg, "--local", "--follow", *common, *overrides])


def top1(run_dir: Path) -> tuple[int, float]:
    """The last eval step and its top-1 in the run's metrics.jsonl."""
    last = (0, float("nan"))
    for record in read_metrics_log(run_dir):
        if EVAL_TOP1 in record:
            last = (record["step"], record[EVAL_TOP1])
    return last


def write_data() -> None:
    py = sys.executable
    if not (SYNTHETIC / "_info.json").exists():
        sh([py, "-m", "pipeline.data", "write", "--out", SYNTHETIC, "--synthetic", "4000", "--classes", "10",
            "--size", "32"])  # fmt: skip
    if not (DIGITS / "_info.json").exists():
        sh([py, "-m", "pipeline.data", "write", "--out", DIGITS, "--digits", "--size", "32"])
    if not UNLABELED.exists():  # the same shards and splits, without their labels
        sh([py, "-m", "pipeline.data", "index", f"{SYNTHETIC}/train-*.tar", "--val", f"{SYNTHETIC}/val-*.tar",
            "--unlabeled", "--out", UNLABELED, "--no-progress"])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete the runs (not the shards) first")
    p.add_argument("--pretrain-steps", type=int, default=200, help="both pretrains (the demo's 200)")
    p.add_argument("--finetune-steps", type=int, default=600, help="every fine-tune (the demo's 600)")
    args = p.parse_args(argv)
    if args.fresh:
        for d in OUT.glob("*"):
            if d.name != "data":
                shutil.rmtree(d)
    write_data()
    pre, ft = f"train.steps={args.pretrain_steps}", f"train.steps={args.finetune_steps}"
    seconds = {
        "supervised pretrain": submit(None, OUT / "pre_supervised", f"data.path={SYNTHETIC}", pre),
        "MAE pretrain (unlabeled)": submit(
            REPO / "configs" / "pretrain" / "mae_tiny.yaml", OUT / "pre_mae", f"data.path={UNLABELED}", pre
        ),
    }
    digits = f"data.path={DIGITS}"
    init = "finetune.init_from="
    starts = {
        "random init": (DIGITS_FT, OUT / "ft_random", [init, "model.num_classes=10"]),
        "supervised synthetic pretrain": (DIGITS_FT, OUT / "ft_supervised", [f"{init}{OUT / 'pre_supervised'}"]),
        "MAE pretrain, synthetic without labels": (MAE_FT, OUT / "ft_mae", [f"{init}{OUT / 'pre_mae'}"]),
    }
    for name, (config, run_dir, extra) in starts.items():
        seconds[f"fine-tune from {name}"] = submit(config, run_dir, digits, ft, *extra)
    print(
        f"\ndigits fine-tune, {args.finetune_steps} steps of 64, seed 0, 2 CPU ranks; "
        f"pretrains {args.pretrain_steps} steps"
    )
    print("| start | fine-tune eval step | digits val top-1 |\n|---|---|---|")
    for name, (_, run_dir, _) in starts.items():
        step, value = top1(run_dir)
        print(f"| {name} | {step} | {value:.4f} |")
    print("\nwall time per run (s, includes start-up): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
