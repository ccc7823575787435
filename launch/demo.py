"""The local demo, end to end on a laptop's CPU (`make demo` runs it after installing):

1. write small shards: 4,000 procedurally drawn 32x32 images of 10 classes (pretraining) and
   scikit-learn's real digits (fine-tuning),
2. pretrain the embedded default (a tiny ViT, 2 CPU ranks, DeepSpeed ZeRO-2, local MLflow store)
   through the same launcher a cluster user runs,
3. fine-tune it on digits straight from its sharded checkpoint (configs/finetune/digits.yaml);
   both runs go to the MLflow experiment "demo", as pretrain_synthetic and finetune_digits,
4. print both runs' final top-1 and the commands to open and compare them in the MLflow UI.

Re-running it resumes or skips what is already done; `--fresh` starts the two runs over.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.metric_names import EVAL_TOP1
from pipeline.train.metrics_log import read_metrics_log

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs"
# Both runs in one experiment of their own (not MLflow's "Default"), named for what they are; the
# names are also the run dirs (runs/<name>), which configs/finetune/digits.yaml's init_from expects.
EXPERIMENT = "demo"
PRETRAIN_NAME = "pretrain_synthetic"
PRETRAIN_RUN = RUNS / PRETRAIN_NAME
FINETUNE_CONFIG = REPO / "configs" / "finetune" / "digits.yaml"
FINETUNE_RUN = RUNS / "finetune_digits"  # the config's name
DATA = {
    RUNS / "data" / "synthetic": ["--synthetic", "4000", "--classes", "10", "--size", "32"],
    RUNS / "data" / "digits": ["--digits", "--size", "32"],
}


def step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"demo: '{title}' failed (exit {proc.returncode}); see the output above")
    print(f"== {title}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def final_top1(run_dir: Path) -> float | None:
    """The last eval/top1 in <run_dir>/metrics.jsonl (readable without a tracking server)."""
    top1 = None
    for record in read_metrics_log(run_dir):
        top1 = record.get(EVAL_TOP1, top1)
    return top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the two demo runs first (the shards are kept)")
    args = parser.parse_args(argv)
    py = sys.executable
    if args.fresh:
        for run_dir in (PRETRAIN_RUN, FINETUNE_RUN):
            shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    for out, source in DATA.items():
        if not (out / "_info.json").exists():
            step(
                f"write shards {out.relative_to(REPO)}",
                [py, "-m", "pipeline.data", "write", "--out", str(out), *source],
            )
    tracking = f"tracking.experiment={EXPERIMENT}"
    step(
        "pretrain (embedded default config)",
        [py, "launch/submit.py", "--local", "--follow", f"name={PRETRAIN_NAME}", tracking],
    )
    finetune = str(FINETUNE_CONFIG.relative_to(REPO))
    step("fine-tune on digits", [py, "launch/submit.py", "--config", finetune, "--local", "--follow", tracking])
    pre, ft = final_top1(PRETRAIN_RUN), final_top1(FINETUNE_RUN)
    print(f"\n== demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"pretrain  (synthetic, 10 classes): eval/top1 = {pre:.4f}   run dir {PRETRAIN_RUN.relative_to(REPO)}")
    print(f"fine-tune (digits, 10 classes):    eval/top1 = {ft:.4f}   run dir {FINETUNE_RUN.relative_to(REPO)}")
    store = f"sqlite:///{RUNS / 'mlflow.db'}"
    mlflow = Path(py).parent / "mlflow"
    print("\nOpen the MLflow UI on the local store, then browse http://127.0.0.1:5000 :")
    print(f"  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow} ui --backend-store-uri {store} --workers 1")
    print(f"  (or, detached: {py} launch/mlflow_server.py start --backend-uri {store})")
    print("Compare the two runs side by side (a table here, and the UI's compare-page URL):")
    print(f"  {py} launch/compare.py {PRETRAIN_RUN.relative_to(REPO)} {FINETUNE_RUN.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
