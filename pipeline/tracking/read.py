"""Reading runs back: for ``launch/compare.py`` and for the fine-tune stage (which run was pretraining?)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.metric_names import HEADLINE_METRICS
from pipeline.tracking.state import read_tracking_state

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_HIDDEN_PARAMS = ("tracking.",)  # where a run was tracked says nothing about what it trained


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    experiment_id: str
    experiment: str
    status: str
    tracking_uri: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the value at each key's last step
    tags: dict[str, str] = field(default_factory=dict)


def resolve_ref(ref: str | Path, uri: str | None = None) -> tuple[str, str]:
    """``(tracking_uri, run_id)`` for a run id or a run directory (its ``tracking.json``).

    The URI is ``uri``, else the run directory's, else ``$MLFLOW_TRACKING_URI``.
    """
    path = Path(ref)
    if path.is_dir():
        state = read_tracking_state(path)
        if not state.get("run_id"):
            raise ValueError(
                f"{path} has no tracking.json with a run id: it is not a run directory, or its run was never "
                f"created (the tracking store did not answer; see {path}/tracking_buffer.jsonl)"
            )
        return uri or state["tracking_uri"], state["run_id"]
    if _RUN_ID.match(str(ref)):
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"run id {ref} needs a tracking store: pass --tracking-uri or set MLFLOW_TRACKING_URI "
                f"(or pass the run directory instead)"
            )
        return uri, str(ref)
    raise ValueError(f"{ref!r} is neither a run directory (with tracking.json) nor an MLflow run id (32 hex digits)")


def find_run(ref: str | Path, *, uri: str | None = None) -> RunSummary:
    """The run a run id or run directory refers to, with its params, final metrics and tags."""
    store_uri, run_id = resolve_ref(ref, uri)
    return run_summary(store_uri, run_id)


def run_summary(uri: str, run_id: str) -> RunSummary:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.backend import configure_http

    configure_http(timeout_s=10.0, max_retries=1, keep_existing=True)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id} not readable from {uri}: {str(e).splitlines()[0][:300]}") from None
    return RunSummary(
        run_id=run_id,
        run_name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        experiment=experiment.name,
        status=run.info.status,
        tracking_uri=uri,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"},
    )


def experiment_runs(uri: str, experiment: str, max_runs: int = 20) -> list[RunSummary]:
    """The newest ``max_runs`` runs of an experiment (by name), newest first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.backend import configure_http

    configure_http(timeout_s=10.0, max_retries=1, keep_existing=True)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments(max_results=50))
            raise ValueError(f"no experiment {experiment!r} in {uri} (experiments: {names or 'none'})")
        runs = client.search_runs([exp.experiment_id], max_results=max_runs, order_by=["attributes.start_time DESC"])
    except MlflowException as e:
        raise ValueError(f"experiment {experiment!r} not readable from {uri}: {str(e).splitlines()[0][:300]}") from None
    return [run_summary(uri, r.info.run_id) for r in runs]


def compare_rows(
    runs: list[RunSummary], *, all_params: bool = False, metrics: tuple[str, ...] = HEADLINE_METRICS
) -> list[tuple[str, list[str]]]:
    """Rows ``(label, one cell per run)``: run name and id, the params that differ (all with
    ``all_params``), the pretrain link when any run has one, and the final headline metrics."""
    rows: list[tuple[str, list[str]]] = [
        ("run", [r.run_name for r in runs]),
        ("run_id", [r.run_id for r in runs]),
        ("experiment", [r.experiment for r in runs]),
        ("status", [r.status for r in runs]),
    ]
    keys = sorted({k for r in runs for k in r.params if not k.startswith(_HIDDEN_PARAMS)})
    for key in keys:
        cells = [r.params.get(key, "-") for r in runs]
        if all_params or len(set(cells)) > 1:
            rows.append((key, cells))
    if any("pretrain.run_name" in r.tags for r in runs):
        rows.append(("pretrain", [r.tags.get("pretrain.run_name", "-") for r in runs]))
    shown = [m for m in metrics if any(m in r.metrics for r in runs)]
    for key in shown:
        rows.append((key, [_fmt(r.metrics[key]) if key in r.metrics else "-" for r in runs]))
    return rows


def format_table(rows: list[tuple[str, list[str]]]) -> str:
    """A plain text table, one column per run."""
    width0 = max(len(label) for label, _ in rows)
    ncols = len(rows[0][1])
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(ncols)]
    lines = []
    for n, (label, cells) in enumerate(rows):
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        lines.append("  ".join([label.ljust(width0), *padded]).rstrip())
        if n == 0:
            lines.append("  ".join(["-" * width0] + ["-" * w for w in widths]))
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` recorded for ``key``, in step order."""
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def counted_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """One ``(step, value)`` per step: the value logged last for it. After a rollback or a resume past a
    killed attempt the run holds superseded points too (tagged ``rollback.*``); this is the rule that
    picks the value that counts, the one of the trajectory training continued on."""
    from mlflow import MlflowClient

    last: dict[int, tuple[int, float]] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, key):
        if m.step not in last or m.timestamp >= last[m.step][0]:
            last[m.step] = (m.timestamp, m.value)
    return sorted((step, value) for step, (_, value) in last.items())


def list_artifacts(uri: str, run_id: str) -> list[str]:
    """The run's artifact files (paths relative to its artifact root)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out: list[str] = []
    folders = [None]
    while folders:
        for info in client.list_artifacts(run_id, folders.pop()):
            (folders if info.is_dir else out).append(info.path)
    return sorted(out)
