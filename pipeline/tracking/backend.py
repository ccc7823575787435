"""Every write to MLflow goes through here (with read.py, the only modules that import mlflow).

The tracker's background thread calls these; the training loop never does. HTTP calls are
bounded by ``configure_http`` (MLflow's default retries block a call ~247 s on a dead server).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.metric_names import SYSTEM_PREFIX
from pipeline.tracking.state import Record
from pipeline.tracking.tags import EXPERIMENT_TAGS
from pipeline.tracking.uris import is_remote

log = logging.getLogger(__name__)

MAX_METRICS = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS = 100
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000


class Rejected(Exception):
    """The store answered and refused the records (a bad value, a deleted run): retrying cannot help."""


def configure_http(timeout_s: float, max_retries: int, *, keep_existing: bool = False) -> None:
    """Bound every MLflow HTTP request of this process: ``timeout_s`` per try, ``max_retries`` retries.

    MLflow reads these per request from the environment; ``keep_existing`` leaves values already
    set (a reader in a process whose tracker configured them).
    """
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),  # an int there
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # seconds, doubling per retry (an int there)
    }
    for key, value in values.items():
        if not (keep_existing and key in os.environ):
            os.environ[key] = value
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # machines here are offline
    quiet_outage_chatter()


_OUR_THREADS = ("tracking-", "SystemMetricsMonitor")
_NOISY_LOGGERS = ("urllib3.connectionpool", "mlflow.system_metrics.system_metrics_monitor")


class _OutageChatter(logging.Filter):
    """Drops the retry and outage messages that the tracker's own threads cause: the tracker says
    once itself that the store is down, and a line per retry would flood the job's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not (record.threadName or "").startswith(_OUR_THREADS)


def quiet_outage_chatter() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OutageChatter) for f in logger.filters):
            logger.addFilter(_OutageChatter())


def probe(uri: str, timeout_s: float) -> bool:
    """Whether the server answers ``/health`` (one plain request: no retries, no log noise)."""
    if not is_remote(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def check_access(uri: str) -> tuple[int, str]:
    """One authenticated read through MLflow's client: ``(0, "")`` when it succeeds, else the HTTP
    status (401, 403, ...) or -1 when nothing answered, with the gist of the error."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        status = e.get_http_status_code()
        text = str(e)
        found = re.search(r"Connection refused|timed out|Name or service not known|No route to host", text)
        if found or status == 500 and "Max retries exceeded" in text:
            return -1, found.group(0) if found else "no answer"
        return status, text.splitlines()[0][:200]
    except OSError as e:
        return -1, str(e)[:200]
    return 0, ""


def classify(exc: BaseException) -> Exception:
    """``Rejected`` for a 4xx answer (except 401/403/429, which a fix or time can cure), else ``exc``."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        if 400 <= status < 500 and status not in (401, 403, 429):
            return Rejected(str(exc).splitlines()[0][:300])
    return exc  # type: ignore[return-value]


@dataclass
class ResumedRun:
    experiment_id: str
    status: str
    params: dict[str, str]
    last_steps: dict[str, int]  # per metric key (system metrics excluded)


@dataclass
class Store:
    """One tracking store (a server or a local database) seen through an ``MlflowClient``."""

    uri: str
    client: Any = field(init=False)

    def __post_init__(self) -> None:
        self.client = MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            self._tag_kind(exp)
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=self._artifact_location(name), tags=EXPERIMENT_TAGS
            )
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)  # another job created it meanwhile
            if exp is None:
                raise
            return exp.experiment_id

    def _tag_kind(self, exp: Any) -> None:
        """An experiment made before its kind was set (or by ``mlflow`` itself) gets it now; a kind
        that someone chose in the UI stays."""
        missing = {k: v for k, v in EXPERIMENT_TAGS.items() if k not in exp.tags}
        for key, value in missing.items():
            self.client.set_experiment_tag(exp.experiment_id, key, value)

    def _artifact_location(self, experiment: str) -> str | None:
        """Local stores keep artifacts beside the database (MLflow's default is ./mlruns under the
        current directory); a server decides itself (its --artifacts-destination)."""
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri[len("sqlite:///") :])
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment)
        return (db.parent / "mlartifacts" / safe).resolve().as_uri()

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(experiment_id, run_name=run_name, tags=_clip_tags(tags))
        return run.info.run_id

    def resume_run(self, run_id: str) -> ResumedRun | None:
        """Mark ``run_id`` RUNNING again; ``None`` when this store has no such (live) run."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if isinstance(classify(e), Rejected):
                return None
            raise
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status="RUNNING")
        steps: dict[str, int] = {}
        for m in run.data._metric_objs:  # the latest value per key, at its largest step
            if not m.key.startswith(SYSTEM_PREFIX):
                steps[m.key] = max(steps.get(m.key, -1), int(m.step))
        return ResumedRun(run.info.experiment_id, run.info.status, dict(run.data.params), steps)

    def deliver(self, run_id: str, group: list[Record]) -> None:
        """Send one request's worth of records (see ``plan_requests``); raises on failure."""
        try:
            self._deliver(run_id, group)
        except Exception as e:
            raise classify(e) from e

    def _deliver(self, run_id: str, group: list[Record]) -> None:
        kind = group[0]["t"]
        if kind == "a":
            path = Path(group[0]["path"])
            if not path.exists():
                raise Rejected(f"artifact {path} no longer exists")
            self.client.log_artifact(run_id, str(path), group[0].get("dir"))
        elif kind == "i":
            self.client.log_inputs(run_id, datasets=[_dataset_input(d) for d in group[0]["v"]])
        elif kind == "model":
            from pipeline.tracking.models import deliver_model

            deliver_model(self.client, run_id, group[0])
        elif kind == "end":
            self.client.set_terminated(run_id, group[0]["status"], end_time=group[0]["ts"])
        else:
            metrics = [
                Metric(k, float(v), r["ts"], r["step"]) for r in group if r["t"] == "m" for k, v in r["v"].items()
            ]
            params = {k: v for r in group if r["t"] == "p" for k, v in r["v"].items()}
            tags = {k: v for r in group if r["t"] == "g" for k, v in r["v"].items()}
            self.client.log_batch(
                run_id,
                metrics=metrics,
                params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in _clip_tags(tags).items()],
            )


def _dataset_input(d: dict[str, Any]) -> DatasetInput:
    """A dataset record (``datasets.DatasetInput.to_record``) as MLflow's entity."""
    dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile"))
    return DatasetInput(dataset, tags=[InputTag(k, v) for k, v in d.get("tags", {}).items()])


def _clip_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: str(v)[:MAX_TAG_LEN] for k, v in tags.items()}


def plan_requests(records: list[Record]) -> list[list[Record]]:
    """Split records into requests, keeping their order: runs of metric/param/tag records fill
    one ``log_batch`` up to MLflow's limits; an artifact, dataset inputs, a model or the end of the run goes alone."""
    groups: list[list[Record]] = []
    cur: list[Record] = []
    n_m = n_p = n_g = 0
    for r in records:
        kind = r["t"]
        if kind in ("a", "i", "model", "end"):
            if cur:
                groups.append(cur)
            groups.append([r])
            cur, n_m, n_p, n_g = [], 0, 0, 0
            continue
        size = len(r["v"])
        full = (
            (kind == "m" and n_m + size > MAX_METRICS)
            or (kind == "p" and n_p + size > MAX_PARAMS_TAGS)
            or (kind == "g" and n_g + size > MAX_PARAMS_TAGS)
            or n_m + n_p + n_g + size > MAX_METRICS
        )
        if cur and full:
            groups.append(cur)
            cur, n_m, n_p, n_g = [], 0, 0, 0
        if size > MAX_PARAMS_TAGS and kind in ("p", "g"):
            groups.extend(_split_mapping(r))  # one huge log_params call: its own requests
            continue
        cur.append(r)
        n_m += size if kind == "m" else 0
        n_p += size if kind == "p" else 0
        n_g += size if kind == "g" else 0
    if cur:
        groups.append(cur)
    return groups


def _split_mapping(record: Record) -> list[list[Record]]:
    items = list(record["v"].items())
    return [[{**record, "v": dict(items[i : i + MAX_PARAMS_TAGS])}] for i in range(0, len(items), MAX_PARAMS_TAGS)]


class SystemMetrics:
    """MLflow's system metrics monitor for one run, started and stopped without blocking.

    ``node_id`` prefixes the keys (``system/<node>/cpu_utilization_percentage``) so several nodes
    can report into one run. The monitor stops by itself when the store fails; ``ensure_running``
    starts a new one (continuing its step count) once the store answers again.
    """

    def __init__(self, uri: str, run_id: str, node_id: str | None) -> None:
        self.uri, self.run_id, self.node_id = uri, run_id, node_id
        self._monitor: Any = None
        self._starting: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self._starting is not None and self._starting.is_alive():
            return
        if self._monitor is not None and monitor_running(self._monitor):
            return
        self._starting = threading.Thread(target=self._start, name="tracking-sysmetrics-start", daemon=True)
        self._starting.start()

    def _start(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            # resume_logging continues the step count of a requeued run (it reads the run once).
            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, node_id=self.node_id, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as e:  # psutil missing, store down: no system metrics, training goes on
            log.info("system metrics not started: %s", e)

    def stop(self, timeout_s: float) -> None:
        """Stop and flush within ``timeout_s`` (a hanging store must not hold up the caller)."""
        deadline = time.monotonic() + timeout_s
        if self._starting is not None:
            self._starting.join(max(0.0, deadline - time.monotonic()))
        monitor = self._monitor
        if monitor is None:
            return
        signal_monitor_stop(monitor)
        stopper = threading.Thread(target=monitor.finish, name="tracking-sysmetrics-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))


# MLflow's SystemMetricsMonitor has start()/finish() but no public "is it running" and no way to
# stop its sampling thread without the blocking finish(). These two functions are the only places
# that touch its private attributes; tests/test_library_internals.py fails loudly if they change.
def monitor_running(monitor: Any) -> bool:
    """The monitor's sampling thread is alive."""
    thread = monitor._process
    return thread is not None and thread.is_alive()


def signal_monitor_stop(monitor: Any) -> None:
    """Ask the sampling thread to stop at its next wake-up, without waiting (finish() then flushes)."""
    monitor._shutdown_event.set()
