"""How far a run is, from its own files: what ``--status`` shows for a running job and ``--follow`` ends with.

Reads only what the ranks already write to the run dir (``metrics.jsonl``, ``config.yaml``,
``tracking.json``, ``job.json``, the export folder), so it needs no tracking server, no mlflow import
and no access to the compute nodes: a login node with the shared file system is enough.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts.exports import run_export
from pipeline.config import read_saved_config
from pipeline.metric_names import EVAL_TOP1, TRAIN_IMG_PER_S, TRAIN_LOSS
from pipeline.tracking import read_tracking_state, ui_run_url
from pipeline.tracking.uris import is_remote
from pipeline.train.metrics_log import read_metrics_log

# Seconds-per-step is measured over the newest log records only: the first steps of an attempt
# include compilation, worker start-up and data-cache warm-up, which would inflate the ETA.
_RATE_WINDOW = 10


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float | None
    img_per_s: float | None
    eta_s: float | None  # None until two records of one attempt give a rate
    last_top1: float | None
    best_top1: float | None


def _total_steps(run_dir: Path) -> int | None:
    """``train.steps`` of the config the ranks saved (the validated one, overrides applied)."""
    try:
        return int(read_saved_config(run_dir)["train"]["steps"])  # type: ignore[index]
    except (ValueError, TypeError, KeyError):
        return None


def _seconds_per_step(train: list[dict[str, Any]]) -> float | None:
    """From the newest records of one unbroken span: a resume (time gap, step going back) starts a new one."""
    span = train[-_RATE_WINDOW:]
    for i in range(len(span) - 1, 0, -1):
        if span[i]["step"] <= span[i - 1]["step"]:
            span = span[i:]
            break
    if len(span) < 2 or span[-1]["step"] == span[0]["step"]:
        return None
    return max(0.0, (span[-1]["time"] - span[0]["time"]) / (span[-1]["step"] - span[0]["step"]))


def read_progress(run_dir: str | Path) -> Progress | None:
    """None when the run has logged no training step yet (or its config is unreadable)."""
    run_dir = Path(run_dir)
    records = [r for r in read_metrics_log(run_dir) if isinstance(r.get("step"), int) and "time" in r]
    train = [r for r in records if TRAIN_LOSS in r]
    total = _total_steps(run_dir)
    if not train or total is None:
        return None
    last = train[-1]
    evals = [float(r[EVAL_TOP1]) for r in records if EVAL_TOP1 in r]
    per_step = _seconds_per_step(train)
    step = int(last["step"])
    return Progress(
        step=step,
        total=total,
        loss=float(last[TRAIN_LOSS]),
        img_per_s=float(last[TRAIN_IMG_PER_S]) if TRAIN_IMG_PER_S in last else None,
        eta_s=None if per_step is None else per_step * max(0, total - step),
        last_top1=evals[-1] if evals else None,
        best_top1=max(evals) if evals else None,
    )


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(p: Progress) -> str:
    parts = [f"step {p.step}/{p.total}"]
    parts += [f"loss {p.loss:.4f}"] if p.loss is not None else []
    parts += [f"{p.img_per_s:.1f} img/s"] if p.img_per_s is not None else []
    if p.step >= p.total:
        parts.append("all steps done")
    else:
        parts.append(f"ETA {duration(p.eta_s)}" if p.eta_s is not None else "ETA unknown (one log record so far)")
    if p.best_top1 is not None:
        parts.append(f"eval top-1 {p.last_top1:.4f} (best {p.best_top1:.4f})")
    return ", ".join(parts)


def run_ref(run_dir: str | Path) -> tuple[str, str, str | None] | None:
    """(run id, store URI, the run's UI page when the store is a server) from the run dir's tracking.json;
    None before the run's tracker started (or with tracking off)."""
    state = read_tracking_state(run_dir)
    run_id, uri = state.get("run_id"), str(state.get("tracking_uri", ""))
    if not run_id:
        return None
    page = ui_run_url(uri, str(state.get("experiment_id", "0")), str(run_id)) if is_remote(uri) else None
    return str(run_id), uri, page


def run_link(run_dir: str | Path) -> str:
    """The MLflow run's page when the run logs to a server; else its id and where its store is."""
    ref = run_ref(run_dir)
    if ref is None:
        return "none yet (no tracking.json: tracking is off, or the run has not started its tracker)"
    run_id, uri, page = ref
    if page:
        return page
    return f"run {run_id} in {uri} (browse it with launch/mlflow_server.py, or `mlflow ui --backend-store-uri {uri}`)"


def _wall_time(data: dict[str, Any]) -> float | None:
    """From the first attempt's start to the newest attempt's end, requeue waits included."""
    attempts = data.get("attempts", [])
    try:
        start = dt.datetime.strptime(attempts[0]["started"], "%Y-%m-%dT%H:%M:%S%z")
        end = dt.datetime.strptime(attempts[-1]["ended"], "%Y-%m-%dT%H:%M:%S%z")
    except (IndexError, KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def summary_lines(run_dir: str | Path, data: dict[str, Any]) -> list[str]:
    """What ``--follow`` prints after the job ended: results, where they are, and what it took."""
    run_dir = Path(run_dir)
    p = read_progress(run_dir)
    lines = []
    if p is None:
        lines.append("no training step was logged")
    else:
        lines.append(f"reached step {p.step}/{p.total}, last train loss {p.loss:.4f}")
        if p.best_top1 is not None:
            lines.append(f"eval top-1: final {p.last_top1:.4f}, best {p.best_top1:.4f}")
    export = run_export(run_dir)
    lines.append(f"export: {export if export else 'none'}")
    lines.append(f"MLflow run: {run_link(run_dir)}")
    wall = _wall_time(data)
    attempts = len(data.get("attempts", []))
    took = duration(wall) if wall is not None else "unknown"
    lines.append(f"took {took} over {attempts} attempt(s), {data.get('requeues', 0)} requeue(s)")
    return lines
