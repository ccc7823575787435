"""The tracker seam of the training engine: one writer per run, never in the way of training.

``open_tracker(..., role=...)`` gives every rank a ``Tracker``:

- ``"writer"`` (global rank 0) creates or resumes the MLflow run and logs everything;
- ``"node"`` (local rank 0 of every other node) reports that node's system metrics into the same run;
- ``"none"`` (all other ranks) gets the no-op base class, which costs nothing.

The writer's calls only put records on a queue (microseconds); one background thread delivers them.
When the store is down or hanging, records go to ``<run_dir>/tracking_buffer.jsonl`` (one warning,
once) and are replayed in order when it answers again, or by the next tracker of this run. On a
resume, metric steps at or below the last step recorded per key are dropped, so a requeued job
re-running steps since its checkpoint writes no step twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pipeline.config.schema import ConfigError, TrackingConfig, refuse_uri_credentials
from pipeline.tracking import state as st
from pipeline.tracking.naming import default_tracking_uri, is_remote, read_tracking_state

log = logging.getLogger(__name__)

Role = Literal["writer", "node", "none"]
Status = Literal["FINISHED", "FAILED", "KILLED"]

LOCAL_OPEN_WAIT_S = 120.0  # a new SQLite store creates its tables on first use (seconds)
STATE_SAVE_EVERY_S = 1.0
LEASE_RENEW_EVERY_S = 10.0
AT_EXIT_TIMEOUT_S = 5.0
BATCH_WINDOW_S = 0.5
MAX_BATCH_RECORDS = 2000
_STOP = {"t": "stop"}


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
    _check_uri(uri, tracking)
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
    """Global rank 0's tracker: a queue, one delivery thread, and the local files of ``state``."""

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
        from pipeline.tracking import backend

        self._cfg, self._uri, self._run_dir = tracking, uri, run_dir
        self._multi_node = multi_node
        self._experiment, self._run_name, self._tags = experiment, run_name, dict(tags)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._lease = st.RunDirLease(run_dir)
        self._lease.acquire()
        self._buffer = st.JsonlFile(run_dir / st.BUFFER_FILE)
        self._wal = st.WriteAheadLog(run_dir / st.WAL_FILE)
        self._run_id = self._known_run_id(run_id)
        state = read_tracking_state(run_dir)
        self._settled = self._recover_unsettled(int(state.get("wal_settled", 0)))
        # Steps recorded before this open are not logged again: those the buffer holds (they go to
        # whichever run this tracker writes) and, when continuing the same run, those of its notes.
        self._buffered_steps = st.last_steps(self._buffer.read())
        noted = state.get("last_steps", {}) if self._run_id and state.get("run_id") == self._run_id else {}
        self._floors = st.merge_steps(noted, self._buffered_steps)
        self._steps = dict(self._floors)  # highest step per key, updated by the worker
        self._past = [r for r in self._wal.records if r["t"] == "m"]  # earlier incarnations, for the plot
        self._logged: list[dict[str, Any]] = []  # this incarnation's metric records, for the plot
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: list[dict[str, Any]] = []
        self._known_params: dict[str, str] = {}
        self._experiment_id = ""
        self._down = self._warned = self._abandoned = self._closed = False
        self._undelivered = 0
        self._cap: int | None = None  # set by rolled_back(): no floor above the checkpoint's step
        self._last_try = self._last_save = self._last_renew = 0.0
        self._ready = threading.Event()
        self._wake = threading.Event()  # set by close(): stop gathering, deliver now
        self._store = backend.Store(uri)
        self._sysmetrics: Any = None
        self.log_params(params)
        self._thread = threading.Thread(target=self._work, name="tracking-writer", daemon=True)
        self._thread.start()
        if not self._ready.wait(tracking.timeout_s if is_remote(uri) else LOCAL_OPEN_WAIT_S):
            self._warn_once(f"{uri} did not answer within {tracking.timeout_s:.0f} s at start")
        atexit.register(self._at_exit)

    def _recover_unsettled(self, settled: int) -> int:
        """Records an earlier tracker of this run accepted but never settled (it was killed with them
        in its queue) go into the buffer, ahead of anything new; returns the new settled ``seq``."""
        in_buffer = {r.get("seq") for r in self._buffer.read()}
        lost = [r for r in self._wal.records if int(r.get("seq", 0)) > settled and r.get("seq") not in in_buffer]
        if lost:
            log.warning(
                "tracking: %d record(s) of an earlier start of this run were never delivered (it was killed); "
                "replaying them from %s",
                len(lost),
                self._wal.path,
            )
            self._buffer.append(lost)
        now = self._wal.next_seq - 1
        if now != settled:
            st.save_tracking_state(self._run_dir, wal_settled=now)
        return now

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

    # -- the caller's side: cheap, never touches the store -------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        floors = self._floors
        values = {k: float(v) for k, v in metrics.items() if step > floors.get(k, -1)}
        if values:
            record = {"t": "m", "step": int(step), "ts": int(time.time() * 1000), "v": values}
            self._logged.append(record)
            self._accept(record)

    def log_params(self, params: dict[str, object]) -> None:
        if params and not self._closed:
            self._accept({"t": "p", "v": {k: _param_str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags and not self._closed:
            self._accept({"t": "g", "v": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self._closed:
            self._accept({"t": "a", "path": str(Path(path).resolve()), "dir": artifact_path})

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
        self._queue.put(record)

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
        deadline = time.monotonic() + timeout_s
        if plot:
            self.log_history_plot()
        self._closed = True
        atexit.unregister(self._at_exit)
        if self._sysmetrics is not None:
            self._sysmetrics.stop(timeout_s=min(5.0, max(0.0, deadline - time.monotonic())))
        self._accept({"t": "end", "status": status, "ts": int(time.time() * 1000)})
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            left = self._abandon()
            log.warning(
                "tracking: %s did not take everything within %.0f s; %d record(s) stay in %s and are replayed "
                "by the next tracker of this run",
                self._uri,
                timeout_s,
                left,
                self._buffer.path,
            )
        self._save_state(force=True)
        self._wal.close()
        self._lease.release()
        self._undelivered = len(self._buffer.read())
        if self._undelivered:
            log.error(
                "tracking: %d record(s) never reached %s; they stay in %s and are replayed at the next start of "
                "this run (run the same command again once the store answers)",
                self._undelivered,
                self._uri,
                self._buffer.path,
            )

    @property
    def undelivered(self) -> int:
        return self._undelivered

    def _at_exit(self) -> None:
        """The interpreter exits without close() (an exception ended training): end the run as FAILED,
        briefly; whatever does not make it stays in the buffer for the next start of this run."""
        self.close("FAILED", timeout_s=AT_EXIT_TIMEOUT_S)

    def _abandon(self) -> int:
        """Stop the worker's deliveries; put what it has not confirmed into the buffer file."""
        with self._lock:
            self._abandoned = True
            pending = list(self._inflight)
        queued = []
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is not _STOP:
                queued.append(r)
        self._buffer.append(pending + queued)
        self._settle(pending + queued)
        self._steps = st.merge_steps(self._steps, st.last_steps(queued))
        return len(pending) + len(queued)

    # -- the worker thread: all store traffic ---------------------------------------------------

    def _work(self) -> None:
        try:
            self._connect()
            while not self._abandoned:
                batch = self._next_batch()
                stop = any(r is _STOP for r in batch)
                self._handle([r for r in batch if r is not _STOP])
                if stop and self._down:
                    self._recover()  # one last try before the process may exit
                self._housekeeping()
                if stop:
                    return
        except Exception:  # a tracking bug must never reach training; keep the records for the next start
            log.exception("tracking: writer thread failed; records stay in %s", self._buffer.path)
            self._abandon()

    def _next_batch(self) -> list[dict[str, Any]]:
        """Wait for a record, then let records gather for ``BATCH_WINDOW_S`` (cut short by close()):
        one request per window instead of one per call keeps this thread's share of the CPU and of
        the GIL small."""
        wait = self._cfg.retry_s if self._down else LEASE_RENEW_EVERY_S
        try:
            batch = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        if batch[0] is not _STOP:
            self._wake.wait(BATCH_WINDOW_S)
        while len(batch) < MAX_BATCH_RECORDS:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _connect(self) -> None:
        """Create or resume the run; if the store does not answer, buffer until it does."""
        try:
            if not _probe(self._uri, self._cfg.timeout_s):
                raise ConnectionError(f"{self._uri}/health did not answer")
            self._start_run()
            self._replay()
        except Exception as e:
            self._went_down(e)
        finally:
            self._ready.set()

    def _start_run(self) -> None:
        resumed = self._store.resume_run(self._run_id) if self._run_id else None
        if self._run_id and resumed is None:
            log.warning("tracking: run %s is not in %s (deleted?); starting a new run", self._run_id, self._uri)
        if resumed is not None:
            self._experiment_id = resumed.experiment_id
            self._known_params = resumed.params
            self._floors = st.merge_steps(self._floors, resumed.last_steps)
            if self._cap is not None:  # rolled_back() came first: the store's later steps are superseded
                self._floors = {k: min(v, self._cap) for k, v in self._floors.items()}
            self._steps = st.merge_steps(self._steps, resumed.last_steps)
            self._queue.put({"t": "g", "v": self._tags})  # e.g. the new requeue count
            log.info("tracking: resumed run %s in %s", self._run_id, self._uri)
        else:
            self._floors = dict(self._buffered_steps)  # a new run: only what the buffer holds is recorded
            if self._cap is not None:
                self._floors = {k: min(v, self._cap) for k, v in self._floors.items()}
            self._experiment_id = self._store.experiment_id(self._experiment)
            self._run_id = self._store.create_run(self._experiment_id, self._run_name, self._tags)
            log.info("tracking: run %s (%s) in %s", self._run_id, self._run_name, self._uri)
        st.save_tracking_state(
            self._run_dir,
            run_id=self._run_id,
            run_name=self._run_name,
            experiment=self._experiment,
            experiment_id=self._experiment_id,
            tracking_uri=self._uri,
        )
        if self._cfg.system_metrics and not self._closed:
            from pipeline.tracking.backend import SystemMetrics

            # Several nodes report into one run, each under its name; a single node keeps the plain
            # keys, comparable across runs.
            self._sysmetrics = SystemMetrics(self._uri, self._run_id, st.node_name() if self._multi_node else None)
            self._sysmetrics.ensure_running()

    def _handle(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        metrics = [r for r in records if r["t"] == "m"]
        self._steps = st.merge_steps(self._steps, st.last_steps(metrics))
        with self._lock:
            if self._abandoned:
                return
            self._inflight = records
        if self._down:
            self._buffer.append(records)
        else:
            self._send(records)
        with self._lock:
            self._inflight = []
            if not self._abandoned:  # else _abandon() settles what it moved to the buffer
                self._settle(records)

    def _settle(self, records: list[dict[str, Any]]) -> None:
        """Records delivered, refused or in the buffer file: the WAL need not replay them."""
        self._settled = max([self._settled, *(int(r.get("seq", 0)) for r in records)])

    def _send(self, records: list[dict[str, Any]]) -> None:
        from pipeline.tracking.backend import Rejected, plan_requests

        groups = plan_requests(self._filter_params(records))
        for i, group in enumerate(groups):
            with self._lock:
                if self._abandoned:
                    return
                self._inflight = [r for g in groups[i:] for r in g]
            try:
                self._store.deliver(self._run_id, group)
            except Rejected as e:
                log.warning("tracking: %s refused %d record(s), dropped: %s", self._uri, len(group), e)
                continue
            except Exception as e:
                self._went_down(e)
                self._buffer.append(self._inflight)
                return
            self._delivered(group)

    def _filter_params(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """MLflow params cannot change: a new value for a known key (a resumed job started with another
        setting) is kept as the tag ``param_changed.<key>`` = ``old -> new`` instead."""
        out = []
        for r in records:
            if r["t"] != "p":
                out.append(r)
                continue
            fresh = {k: v for k, v in r["v"].items() if k not in self._known_params}
            changed = {
                f"param_changed.{k}": f"{self._known_params[k]} -> {v}"
                for k, v in r["v"].items()
                if k in self._known_params and self._known_params[k] != v
            }
            if fresh:
                out.append({"t": "p", "v": fresh})
            if changed:
                log.warning("tracking: params changed on resume, kept as tags: %s", changed)
                out.append({"t": "g", "v": changed})
        return out

    def _delivered(self, group: list[dict[str, Any]]) -> None:
        for r in group:
            if r["t"] == "p":
                self._known_params.update(r["v"])

    def _went_down(self, exc: BaseException) -> None:
        self._down = True
        self._last_try = time.monotonic()
        self._warn_once(f"{self._uri} failed ({_reason(exc)})")

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "tracking: %s; training goes on, metrics are buffered in %s and replayed when the store "
                "answers again (checked every %g s) or at the next start of this run",
                why,
                self._buffer.path,
                self._cfg.retry_s,
            )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._down and now - self._last_try >= self._cfg.retry_s:
            self._recover()
        if now - self._last_renew >= LEASE_RENEW_EVERY_S:
            self._last_renew = now
            self._lease.renew()
        self._save_state()

    def _recover(self) -> None:
        self._last_try = time.monotonic()
        if not _probe(self._uri, self._cfg.timeout_s):
            return
        try:
            if self._run_id is None or not self._experiment_id:
                self._start_run()
            self._replay()
        except Exception as e:
            self._went_down(e)
            return
        self._down = False
        if self._sysmetrics is not None and not self._closed:
            self._sysmetrics.ensure_running()

    def _replay(self) -> None:
        """Send the buffer file in order; on a failure keep what is left (and anything appended since)."""
        from pipeline.tracking.backend import Rejected, plan_requests

        raw = self._buffer.read()
        if not raw:
            return
        # An end-of-run buffered by an earlier incarnation must not end the run this one resumes.
        records = self._filter_params([r for r in raw if r["t"] != "end" or self._closed])
        sent = 0
        for group in plan_requests(records):
            try:
                self._store.deliver(self._run_id, group)
            except Rejected as e:
                log.warning("tracking: %s refused %d buffered record(s), dropped: %s", self._uri, len(group), e)
            except Exception:
                self._buffer.replace(records[sent:] + self._buffer.read()[len(raw) :])
                raise
            else:
                self._delivered(group)
            sent += len(group)
        self._buffer.take(len(raw))
        log.info("tracking: %s answers; replayed %d buffered record(s)", self._uri, len(raw))

    def _save_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < STATE_SAVE_EVERY_S:
            return
        self._last_save = now
        try:
            # Durable first, then marked settled: a crash between the two replays, never loses.
            self._wal.sync()
            fields: dict[str, Any] = {"wal_settled": self._settled}
            if self._run_id is not None:
                fields["last_steps"] = dict(self._steps)
            st.save_tracking_state(self._run_dir, **fields)
        except (OSError, ValueError) as e:
            log.debug("tracking.json not written: %s", e)


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


_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


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
    _check_uri(uri, tracking)
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
        raise TrackingUnavailable(f"MLflow run {run_id} not checked in {uri} ({_reason(e)})") from None
    return f"MLflow run {run_id} marked {status}: its job ended without ending it"


def _check_uri(uri: str, tracking: TrackingConfig) -> None:
    source = "tracking.uri" if tracking.uri else "MLFLOW_TRACKING_URI"
    refuse_uri_credentials(uri, source)
    scheme = uri.partition("://")[0].partition("+")[0] if "://" in uri else ""
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{source}={uri!r} is not a tracking URI MLflow can use; give http://host:port (a server), "
            f"sqlite:////abs/path/mlflow.db (a local store) or a database URI ({', '.join(_SCHEMES)})"
        )


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


_REASONS = re.compile(r"Connection refused|Read timed out|timed out|Name or service not known|error code \d+ != 200")


def _reason(exc: BaseException) -> str:
    """The gist of an MLflow/urllib3 error (their messages run to several hundred characters)."""
    text = str(exc).strip()
    found = _REASONS.search(text)
    if found:
        return found.group(0)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _param_str(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def _probe(uri: str, timeout_s: float) -> bool:
    from pipeline.tracking.backend import probe

    return probe(uri, timeout_s)
