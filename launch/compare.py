"""Compare runs side by side: key params (the ones that differ) and final headline metrics.

    python launch/compare.py runs/vit_b16-lr3e-4 runs/vit_b16-lr1e-3      # run directories
    python launch/compare.py 3f2a...e1 9b7c...04 --tracking-uri http://login1:5000
    python launch/compare.py --experiment pretrain --tracking-uri http://login1:5000
    python launch/compare.py runs/smoke-sweep --sort eval/top1 --top 5     # a sweep: one row per member

Prints a table and the URL of the MLflow UI's compare page for the same runs (a sweep: its top k
by --sort; the UI's compare view struggles past ~100 runs, this table does not).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `launch` and `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import sweep, sweep_table  # noqa: E402
from pipeline.metric_names import EVAL_LOSS, EVAL_TOP1, TRAIN_LOSS  # noqa: E402
from pipeline.tracking import (  # noqa: E402
    HEADLINE_METRICS,
    RunSummary,
    compare_rows,
    experiment_runs,
    find_run,
    format_table,
    ui_compare_url,
)
from pipeline.tracking.uris import is_remote  # noqa: E402

LOCAL_UI = "http://127.0.0.1:5000"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run directories (with tracking.json) or MLflow run ids")
    p.add_argument("--experiment", "-e", default="", help="add the newest runs of this experiment")
    p.add_argument("--max-runs", type=int, default=10, help="with --experiment: how many (%(default)s)")
    p.add_argument("--tracking-uri", default=None, help="default: the run directory's store, else $MLFLOW_TRACKING_URI")
    p.add_argument("--all", action="store_true", help="show every param, not only those that differ")
    p.add_argument("--metric", action="append", default=[], help="another metric row (repeatable)")
    p.add_argument("--ui-url", default=None, help="base URL of the UI (e.g. http://localhost:5000 through a tunnel)")
    p.add_argument("--sort", default=EVAL_TOP1, metavar="METRIC", help="a sweep: order by this metric (%(default)s; "
                   "a loss ascending, others descending)")  # fmt: skip
    p.add_argument("--top", type=int, default=10, metavar="K", help="a sweep: the UI compare URL of the best K "
                   "(%(default)s)")  # fmt: skip
    return p


def compare_sweep(args: argparse.Namespace) -> int:
    """A sweep dir: one row per member, best --sort first, then the UI compare URL of the top k."""
    record = sweep.read_record(args.runs[0])
    entries = sweep_table.ranked(args.runs[0], args.sort, args.tracking_uri)
    metrics = tuple(dict.fromkeys([args.sort, EVAL_TOP1, EVAL_LOSS, TRAIN_LOSS, *args.metric]))
    print(f"sweep {record['sweep_id']}: {len(entries)} members, sorted by {args.sort}")
    print(sweep_table.compare_table(record, entries, metrics))
    states = {r.member["index"]: r.state for r in entries}
    for line in sweep_table.failures(record, states):
        print(f"  failed: {line}")
    top = [r.run for r in entries[: max(args.top, 0)] if r.run is not None]
    if top:
        print(f"\ntop {len(top)} by {args.sort}:")
        print(ui_hint(top, args.ui_url))
    return 0


def collect(args: argparse.Namespace) -> list[RunSummary]:
    runs = [find_run(ref, uri=args.tracking_uri) for ref in args.runs]
    if args.experiment:
        uri = args.tracking_uri or (runs[0].tracking_uri if runs else os.environ.get("MLFLOW_TRACKING_URI"))
        if not uri:
            raise ValueError("--experiment needs --tracking-uri or MLFLOW_TRACKING_URI")
        runs += experiment_runs(uri, args.experiment, args.max_runs)
    seen: set[str] = set()
    runs = [r for r in runs if not (r.run_id in seen or seen.add(r.run_id))]
    if not runs:
        raise ValueError("nothing to compare: pass run directories, run ids or --experiment NAME")
    stores = sorted({r.tracking_uri for r in runs})
    if len(stores) > 1:
        raise ValueError(f"the runs live in different tracking stores ({', '.join(stores)}); compare runs of one store")
    return runs


def ui_hint(runs: list[RunSummary], ui_url: str | None) -> str:
    uri = runs[0].tracking_uri
    base = ui_url or (uri if is_remote(uri) else LOCAL_UI)
    url = ui_compare_url(base, [r.run_id for r in runs], [r.experiment_id for r in runs])
    if is_remote(uri) or ui_url:
        return f"MLflow UI compare page: {url}"
    return (
        f"local store: serve it with\n  python launch/mlflow_server.py start --backend-uri {uri} --port 5000\n"
        f"MLflow UI compare page: {url}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if len(args.runs) == 1 and not args.experiment and sweep.is_sweep_dir(args.runs[0]):
        return compare_sweep(args)
    try:
        runs = collect(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = tuple(dict.fromkeys([*HEADLINE_METRICS, *args.metric]))
    print(format_table(compare_rows(runs, all_params=args.all, metrics=metrics)))
    print()
    print(ui_hint(runs, args.ui_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
