"""The tracker seam of the training engine: one writer per run, never in the way of training.

``open_tracker(..., role=...)`` gives every rank a ``Tracker``:

- ``"writer"`` (global rank 0) creates or resumes the MLflow run and logs everything;
- ``"node"`` (local rank 0 of every other node) reports that node's system metrics into the same run;
- ``"none"`` (all other ranks) gets the no-op base class, which costs nothing.

This module is the caller's side: the calls training makes, on the training thread. The writer's
calls only write a record to the write-ahead log and queue it (microseconds); ``delivery.py``'s one
background thread takes it from there. When the store is down or hanging, records go to
``<run_dir>/tracking_buffer.jsonl`` (one warning, once) and are replayed in order when it answers
again, or by the next tracker of this run. On a resume, metric steps at or below the last step
recorded per key are dropped here, so a requeued job re-running steps since its checkpoint writes
no step twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pipeline.config.schema import TrackingConfig
from pipeline.metric_names import QUIET_WHILE_ZERO
from pipeline.tracking import state as st
from pipeline.tracking.datasets import DatasetInput
from pipeline.tracking.delivery import Delivery, reason
from pipeline.tracking.state import read_tracking_state
from pipeline.tracking.uris import check_uri, default_tracking_uri, is_remote

log = logging.getLogger(__name__)

Role = Literal["writer", "node", "none"]
Status = Literal["FINISHED", "FAILED", "KILLED"]

AT_EXIT_TIMEOUT_S = 5.0
# close() waits this much longer once a model was logged: its weights are one upload of up to
# gigabytes, and a model cut off is only delivered by the next start of the run.
MODEL_UPLOAD_S = 600.0


class Tracker:
    """The interface, and the no-op tracker of ranks that do not log (or tracking disabled)."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``; never blocks on the tracking store."""

    def log_params(self, params: dict[str, object]) -> None:
        """Record params (values become strings); a param changed on resume becomes a tag."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set or overwrite tags of the run."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (read when delivered: keep it until the tracker is closed)."""

    def log_datasets(self, inputs: list[DatasetInput]) -> None:
        """Record the data set splits the run reads as MLflow dataset inputs (idempotent per run)."""

    def log_model(self, export_dir: Path, *, register_as: str = "", best_top1: float | None = None) -> None:
        """Log the export in ``export_dir`` as the run's MLflow model ``runs:/<run_id>/model``
        (tracking/models.py) and register it under ``register_as`` when set, tagged with the run's
        headline metrics (``best_top1``: the best evaluation, when the caller kept it)."""

    def log_history_plot(self) -> None:
        """Render the loss/accuracy PNG from every metric logged so far and upload it."""

    def rolled_back(self, to_step: int, from_step: int | None = None) -> None:
        """Training goes on from the checkpoint of ``to_step`` (a rollback from ``from_step``, or a resume
        after a kill): the points logged for later steps are superseded by the ones logged next."""

    @property
    def undelivered(self) -> int:
        """After close(): how many records never reached the store (they stay in the buffer file)."""
        return 0

    def close(self, status: Status = "FINISHED", timeout_s: float = 30.0, *, plot: bool = True) -> None:
        """Flush within ``timeout_s``, end the run with ``status``; what is left stays buffered.
        ``plot=False`` skips the history plot (a stop on SIGTERM has seconds before SIGKILL)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


def open_tracker(
    tracking: TrackingConfig,
    *,
    run_dir: Path,
    experiment: str,
    run_name: str,
    run_id: str | None = None,
    params: dict[str, object] | None = None,
    tags: dict[str, str] | None = None,
    role: Role = "writer",
    num_nodes: int = 1,
) -> Tracker:
    """The tracker for this rank's ``role`` (see the module doc).

    ``run_id`` (from the checkpoint) resumes that run; without it the writer resumes the run
    recorded in ``run_dir/tracking.json`` if any, else creates one. ``params`` (the flattened
    config) and ``tags`` are logged at once; ``tracking.tags`` are added to ``tags``.
    ``num_nodes`` (the caller's distributed environment) > 1 names the writer's system metrics
    by node, as the other nodes' trackers do.
    """
    if role == "none" or not tracking.enabled:
        return Tracker()
    run_dir = Path(run_dir)
    uri = default_tracking_uri(tracking, run_dir)
    check_uri(uri, tracking)
    from pipeline.tracking import backend  # imports mlflow: only ranks that log pay for it

    backend.configure_http(tracking.timeout_s, tracking.max_retries)
    if role == "node":
        return NodeTracker(tracking, uri=uri, run_dir=run_dir, run_id=run_id)
    if role != "writer":
        raise ValueError(f"open_tracker: role must be 'writer', 'node' or 'none', got {role!r}")
    return WriterTracker(
        tracking,
        uri=uri,
        run_dir=run_dir,
        experiment=experiment or "default",
        run_name=run_name,
        run_id=run_id,
        params=params or {},
        tags={**(tags or {}), **tracking.tags},
        multi_node=num_nodes > 1,
    )


class WriterTracker(Tracker):
    """Global rank 0's tracker, the caller's side: accepts records on the training thread.

    It owns the run directory's lease, the write-ahead log (each record is written there before
    it is queued), the floors below which metric steps are dropped, and the history for the plot.
    Everything that talks to the store is its ``Delivery``'s (delivery.py).
    """

    def __init__(
        self,
        tracking: TrackingConfig,
        *,
        uri: str,
        run_dir: Path,
        experiment: str,
        run_name: str,
        run_id: str | None,
        params: dict[str, object],
        tags: dict[str, str],
        multi_node: bool = False,
    ) -> None:
        self._uri, self._run_dir, self._run_name = uri, run_dir, run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        self._lease = st.RunDirLease(run_dir)
        self._lease.acquire()
        self._wal = st.WriteAheadLog(run_dir / st.WAL_FILE)
        run_id = self._known_run_id(run_id)
        state = read_tracking_state(run_dir)
        # Steps recorded before this open are not logged again: those the buffer holds (they go to
        # whichever run this tracker writes) and, when continuing the same run, those of its notes.
        noted = state.get("last_steps", {}) if run_id and state.get("run_id") == run_id else {}
        self._cap: int | None = None  # set by rolled_back(): no floor above the checkpoint's step
        self._delivery = Delivery(
            tracking,
            uri=uri,
            run_dir=run_dir,
            wal=self._wal,
            lease=self._lease,
            experiment=experiment,
            run_name=run_name,
            tags=tags,
            run_id=run_id,
            settled=int(state.get("wal_settled", 0)),
            noted_steps=noted,
            multi_node=multi_node,
            on_run_opened=self._run_opened,
        )
        self._floors = st.merge_steps(noted, self._delivery.buffered_steps)
        self._past = [r for r in self._wal.records if r["t"] == "m"]  # earlier incarnations, for the plot
        self._logged: list[dict[str, Any]] = []  # this incarnation's metric records, for the plot
        self._closed = False
        self._undelivered = 0
        self._nonzero: set[str] = set()  # QUIET_WHILE_ZERO keys that were non-zero once: sent from then on
        self._model_wait_s = 0.0
        self.log_params(params)
        self._delivery.start()
        atexit.register(self._at_exit)

    def _known_run_id(self, run_id: str | None) -> str | None:
        state = read_tracking_state(self._run_dir)
        noted = state.get("run_id") if state.get("tracking_uri") == self._uri else None
        if state.get("run_id") and state.get("tracking_uri") != self._uri and not run_id:
            log.warning(
                "tracking: %s names run %s in %s, not in %s; starting a new run",
                self._run_dir / "tracking.json",
                state["run_id"],
                state.get("tracking_uri"),
                self._uri,
            )
        if run_id and noted and run_id != noted:
            log.warning(
                "tracking: checkpoint run id %s differs from tracking.json's %s; using the checkpoint's", run_id, noted
            )
        return run_id or noted

    def _run_opened(self, steps: dict[str, int], resumed: bool) -> None:
        """On the delivery thread, once the run is open: a resumed run holds ``steps`` besides what
        this tracker knew; a new run holds only ``steps`` (the buffer file's)."""
        floors = st.merge_steps(self._floors, steps) if resumed else dict(steps)
        if self._cap is not None:  # rolled_back() came first: later steps are superseded
            floors = {k: min(v, self._cap) for k, v in floors.items()}
        self._floors = floors

    @property
    def run_id(self) -> str | None:
        return self._delivery.run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def experiment_id(self) -> str:
        return self._delivery.experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        floors = self._floors
        values = {k: float(v) for k, v in metrics.items() if step > floors.get(k, -1) and not self._quiet(k, v)}
        if values:
            record = {"t": "m", "step": int(step), "ts": int(time.time() * 1000), "v": values}
            self._logged.append(record)
            self._accept(record)

    def _quiet(self, key: str, value: float) -> bool:
        """A counter zero so far is not sent: its flat chart would crowd the UI's first screen. From
        its first non-zero value on it is sent at every step (a resume restores its count)."""
        if not key.startswith(QUIET_WHILE_ZERO) or key in self._nonzero:
            return False
        if value != 0:
            self._nonzero.add(key)
            return False
        return True

    def log_params(self, params: dict[str, object]) -> None:
        if params and not self._closed:
            self._accept({"t": "p", "v": {k: _param_str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags and not self._closed:
            self._accept({"t": "g", "v": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self._closed:
            self._accept({"t": "a", "path": str(Path(path).resolve()), "dir": artifact_path})

    def log_datasets(self, inputs: list[DatasetInput]) -> None:
        if inputs and not self._closed:
            self._accept({"t": "i", "v": [d.to_record() for d in inputs]})

    def log_model(self, export_dir: Path, *, register_as: str = "", best_top1: float | None = None) -> None:
        if self._closed:
            return
        from pipeline.tracking.models import build_mlflow_model, headline, model_record

        try:
            # Built here (seconds, at the end of a run) into the run dir: the record names a folder
            # that outlives a down server, like any artifact; the upload is the delivery thread's.
            folder, meta = build_mlflow_model(Path(export_dir))
        except Exception as e:  # a model the store cannot have must never fail a finished run
            log.warning("tracking: %s not saved as an MLflow model: %s", export_dir, e)
            return
        metrics = headline(self._past + self._logged, best_top1)
        self._model_wait_s = MODEL_UPLOAD_S
        self._accept(model_record(folder, meta, register_as=register_as, metrics=metrics, run_name=self._run_name))

    def rolled_back(self, to_step: int, from_step: int | None = None) -> None:
        if self._closed:
            return
        above = max([*self._floors.values(), *st.last_steps(self._logged).values()], default=-1)
        self._cap = to_step if self._cap is None else min(self._cap, to_step)
        self._floors = {k: min(v, to_step) for k, v in self._floors.items()}
        if max(above, from_step or -1) <= to_step:
            return  # nothing recorded past the checkpoint: nothing superseded
        # The re-run steps are the trajectory training continues on: they are logged again (MLflow
        # cannot delete the superseded points), and the tag says which values count.
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        last = max(above, from_step or -1)
        self.set_tags({
            f"rollback.step{to_step}.{int(time.time())}": f"steps {to_step + 1}-{last} re-run from the checkpoint "
            f"of step {to_step} at {when}; for these steps the values logged after that time count, the earlier "
            f"ones are superseded"
        })  # fmt: skip

    def _accept(self, record: dict[str, Any]) -> None:
        """Write-ahead: on disk (the OS's page cache) before it is queued, so a kill cannot lose it."""
        self._wal.append(record)
        self._delivery.put(record)

    def log_history_plot(self) -> None:
        from pipeline.tracking.plots import render_history_plot

        if self._closed:
            return
        out = self._run_dir / "plots" / "metrics.png"
        try:
            if render_history_plot(self._past + self._logged, out, title=self._run_name):
                self.log_artifact(out, "plots")
        except Exception as e:  # a plot must never fail a run
            log.warning("tracking: loss/accuracy plot not rendered: %s", e)

    def close(self, status: Status = "FINISHED", timeout_s: float = 30.0, *, plot: bool = True) -> None:
        if self._closed:
            return
        timeout_s += self._model_wait_s
        deadline = time.monotonic() + timeout_s
        if plot:
            self.log_history_plot()
        self._closed = True
        atexit.unregister(self._at_exit)
        self._delivery.begin_close(deadline)
        self._accept({"t": "end", "status": status, "ts": int(time.time() * 1000)})
        self._delivery.finish(deadline, timeout_s)
        self._wal.close()
        self._lease.release()
        self._undelivered = self._delivery.undelivered()
        if self._undelivered:
            log.error(
                "tracking: %d record(s) never reached %s; they stay in %s and are replayed at the next start of "
                "this run (run the same command again once the store answers)",
                self._undelivered,
                self._uri,
                self._delivery.buffer_path,
            )

    @property
    def undelivered(self) -> int:
        return self._undelivered

    def _at_exit(self) -> None:
        """The interpreter exits without close() (an exception ended training): end the run as FAILED,
        briefly; whatever does not make it stays in the buffer for the next start of this run."""
        self.close("FAILED", timeout_s=AT_EXIT_TIMEOUT_S)


class NodeTracker(Tracker):
    """Local rank 0 of a node other than the writer's: that node's system metrics, same run."""

    def __init__(self, tracking: TrackingConfig, *, uri: str, run_dir: Path, run_id: str | None) -> None:
        self._run_id = run_id or _wait_for_run_id(run_dir, uri, tracking.timeout_s)
        self._sysmetrics: Any = None
        if not tracking.system_metrics or self._run_id is None:
            return
        if not is_remote(uri):
            # Several nodes writing one SQLite file on a shared filesystem is unsafe: one writer only.
            log.info("tracking: per-node system metrics need a tracking server; %s is local", uri)
            return
        from pipeline.tracking.backend import SystemMetrics

        self._sysmetrics = SystemMetrics(uri, self._run_id, st.node_name())
        self._sysmetrics.ensure_running()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def close(self, status: Status = "FINISHED", timeout_s: float = 30.0, *, plot: bool = True) -> None:
        if self._sysmetrics is not None:
            self._sysmetrics.stop(timeout_s=min(timeout_s, 10.0))
            self._sysmetrics = None


class TrackingUnavailable(RuntimeError):
    """The configured tracking store refuses this user or does not answer; the message says the fix."""


def check_tracking(tracking: TrackingConfig, run_dir: Path) -> str:
    """Before a job is queued: the tracking URI is usable, and a server answers one authenticated
    request (MLflow's own client, so MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN apply as in the job).

    Returns a one-line summary; raises ConfigError (bad URI) or TrackingUnavailable.
    """
    if not tracking.enabled:
        return "tracking: off (tracking.enabled=false)"
    uri = default_tracking_uri(tracking, run_dir)
    check_uri(uri, tracking)
    if not is_remote(uri):
        return f"tracking: local store {uri}"
    from pipeline.tracking import backend

    backend.configure_http(tracking.timeout_s, 0)
    status, why = backend.check_access(uri)
    if status == 0:
        return f"tracking: {uri} answers and accepts these credentials"
    if status == 401:
        raise TrackingUnavailable(
            f"the tracking server {uri} refused the credentials (HTTP 401): export the right "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it "
            f"(now: user {os.environ.get('MLFLOW_TRACKING_USERNAME') or 'not set'})"
        )
    if status == 403:
        raise TrackingUnavailable(
            f"the tracking server {uri} denies user {os.environ.get('MLFLOW_TRACKING_USERNAME') or '-'} access "
            f"(HTTP 403): ask its admin for permission, or use another MLFLOW_TRACKING_USERNAME"
        )
    raise TrackingUnavailable(
        f"the tracking server {uri} does not answer ({why}): start it (python launch/mlflow_server.py start), "
        f"fix tracking.uri / MLFLOW_TRACKING_URI, or turn tracking off (tracking.enabled=false)"
    )


def end_orphaned_run(run_dir: Path, status: Status) -> str | None:
    """End the run dir's MLflow run with ``status`` if it still says RUNNING although its job is gone
    (a SIGKILLed or cancelled rank 0 never ends it). Returns what was done, or None (nothing to do);
    raises TrackingUnavailable when the store cannot be asked."""
    state = read_tracking_state(run_dir)
    run_id, uri = state.get("run_id"), state.get("tracking_uri")
    if not run_id or not uri:
        return None
    from pipeline.tracking import backend

    backend.configure_http(5.0, 0, keep_existing=True)
    try:
        client = backend.Store(uri).client
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, status)
    except Exception as e:
        raise TrackingUnavailable(f"MLflow run {run_id} not checked in {uri} ({reason(e)})") from None
    return f"MLflow run {run_id} marked {status}: its job ended without ending it"


def _wait_for_run_id(run_dir: Path, uri: str, timeout_s: float) -> str | None:
    """The writer notes the run id in tracking.json once it has one (pass ``run_id`` to skip the wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_tracking_state(run_dir)
        if state.get("run_id") and state.get("tracking_uri") == uri:
            return state["run_id"]
        if time.monotonic() >= deadline:
            log.info("tracking: no run id for %s yet; this node reports no system metrics", run_dir)
            return None
        time.sleep(0.2)


def _param_str(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)
