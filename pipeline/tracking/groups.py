"""A parent run that groups other runs in the MLflow UI (a sweep's members nest under it).

The runs it groups carry the tag ``mlflow.parentRunId`` = its id; MLflow's runs table then shows
them as children of this run, which holds the group's definition as params and tags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config.schema import TrackingConfig
from pipeline.tracking.delivery import reason
from pipeline.tracking.tracker import TrackingUnavailable
from pipeline.tracking.uris import check_uri, default_tracking_uri


@dataclass(frozen=True)
class ParentRun:
    uri: str
    experiment_id: str
    run_id: str


def open_parent_run(
    tracking: TrackingConfig,
    *,
    run_dir: Path,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
) -> ParentRun | None:
    """Create the parent run in the store and experiment that a run in ``run_dir`` logs to, log
    ``params`` and ``tags`` and end it (it records a definition; its children run on their own).
    None when tracking is off; raises TrackingUnavailable when the store refuses."""
    if not tracking.enabled:
        return None
    uri = default_tracking_uri(tracking, run_dir)
    check_uri(uri, tracking)
    from pipeline.tracking import backend

    backend.configure_http(tracking.timeout_s, tracking.max_retries)
    # The tracker's own requests: params in log_batch calls within MLflow's limits, then the run's end.
    records = [{"t": "p", "v": params}, {"t": "end", "status": "FINISHED", "ts": int(time.time() * 1000)}]
    try:
        store = backend.Store(uri)
        experiment_id = store.experiment_id(experiment)
        run_id = store.create_run(experiment_id, run_name, {**tags, **tracking.tags})
        for group in backend.plan_requests(records):
            store.deliver(run_id, group)
    except Exception as e:
        raise TrackingUnavailable(f"the parent run {run_name!r} could not be created in {uri} ({reason(e)})") from None
    return ParentRun(uri, experiment_id, run_id)


def end_parent_run(parent: ParentRun, status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
    """Mark the parent run (e.g. FAILED when its children could not be submitted)."""
    from pipeline.tracking import backend

    backend.configure_http(5.0, 0, keep_existing=True)
    try:
        backend.Store(parent.uri).client.set_terminated(parent.run_id, status)
    except Exception as e:
        raise TrackingUnavailable(f"parent run {parent.run_id} not updated in {parent.uri} ({reason(e)})") from None
