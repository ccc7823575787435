"""Compare runs side by side: key params (the ones that differ) and final headline metrics.

    python launch/compare.py runs/vit_b16-lr3e-4 runs/vit_b16-lr1e-3      # run directories
    python launch/compare.py 3f2a...e1 9b7c...04 --tracking-uri http://login1:5000
    python launch/compare.py --experiment pretrain --tracking-uri http://login1:5000

Prints a table and the URL of the MLflow UI's compare page for the same runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.tracking import (
    HEADLINE_METRICS,
    RunSummary,
    compare_rows,
    experiment_runs,
    find_run,
    format_table,
    ui_compare_url,
)
from pipeline.tracking.uris import is_remote

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
    return p


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
