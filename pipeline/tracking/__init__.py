"""Experiment tracking (MLflow). The only package of the project that imports mlflow.

Writing (the training engine)::

    tracker = open_tracker(cfg.tracking, run_dir=..., experiment=experiment_for(cfg),
                           run_name=run_name_for(cfg, overrides), run_id=ckpt_run_id,
                           params=flatten(cfg), tags=run_tags(cfg, world_size=ws, num_nodes=nodes),
                           role="writer", num_nodes=nodes)
    tracker.log_metrics({"train/loss": 2.3}, step)   # queue only: never waits on the server
    tracker.close("FINISHED")

Reading (``launch/compare.py``, the fine-tune stage): ``find_run``, ``run_summary``,
``compare_rows``, ``ui_compare_url``, ``pretrain_tags``. Importing this package does not
import mlflow; the writer and the readers do when first used.
"""

from pipeline.metric_names import HEADLINE_METRICS
from pipeline.tracking.groups import ParentRun, end_parent_run, open_parent_run
from pipeline.tracking.read import (
    RunSummary,
    compare_rows,
    counted_history,
    experiment_runs,
    find_run,
    format_table,
    list_artifacts,
    metric_history,
    resolve_ref,
    run_summary,
)
from pipeline.tracking.run_names import experiment_for, run_name_for
from pipeline.tracking.server import SERVER_URL_FILE, read_server_url
from pipeline.tracking.state import read_tracking_state
from pipeline.tracking.tags import pretrain_tags, run_tags
from pipeline.tracking.tracker import (
    Tracker,
    TrackingUnavailable,
    check_tracking,
    end_orphaned_run,
    open_tracker,
)
from pipeline.tracking.uris import default_tracking_uri, ui_compare_url, ui_run_url, ui_runs_url

__all__ = [
    "HEADLINE_METRICS",
    "SERVER_URL_FILE",
    "ParentRun",
    "RunSummary",
    "Tracker",
    "TrackingUnavailable",
    "check_tracking",
    "end_orphaned_run",
    "end_parent_run",
    "compare_rows",
    "counted_history",
    "default_tracking_uri",
    "experiment_for",
    "experiment_runs",
    "find_run",
    "format_table",
    "list_artifacts",
    "metric_history",
    "open_parent_run",
    "open_tracker",
    "pretrain_tags",
    "read_server_url",
    "read_tracking_state",
    "resolve_ref",
    "run_name_for",
    "run_summary",
    "run_tags",
    "ui_compare_url",
    "ui_run_url",
    "ui_runs_url",
]
