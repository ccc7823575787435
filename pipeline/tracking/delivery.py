"""The tracker's delivery thread: all traffic to the tracking store, off the training thread.

Who owns what (the writer of a run is two objects, one per thread):

- ``tracker.WriterTracker``, the caller's side, runs on the training thread. It accepts records:
  drops metric steps already recorded, writes each record to the write-ahead log, hands it to
  :meth:`Delivery.put`, and never waits on the store. It holds the run directory's lease and
  decides which run to continue.
- :class:`Delivery`, here, owns the queue and the one thread that empties it. It creates or resumes
  the MLflow run (and tells the caller's side which steps the store already holds), sends records
  in batches, and when the store is down or hanging moves them to ``tracking_buffer.jsonl``
  (warning once), probes again every ``tracking.retry_s`` and replays the buffer in order. It
  keeps ``tracking.json`` current (run id, the WAL position up to which every record is settled,
  the last step per key), renews the lease, and runs MLflow's system-metrics monitor.

The record format and the files are ``state.py``'s; the MLflow calls are ``backend.py``'s.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config.schema import TrackingConfig
from pipeline.tracking import state as st
from pipeline.tracking.uris import is_remote

log = logging.getLogger(__name__)

LOCAL_OPEN_WAIT_S = 120.0  # a new SQLite store creates its tables on first use (seconds)
STATE_SAVE_EVERY_S = 1.0
LEASE_RENEW_EVERY_S = 10.0
BATCH_WINDOW_S = 0.5
MAX_BATCH_RECORDS = 2000
_STOP = {"t": "stop"}

# Called on the delivery thread once the run is open: (steps the run already holds per key,
# resumed?). Resumed: the store's last steps; a new run: only the buffer file's.
RunOpened = Callable[[dict[str, int], bool], None]


class Delivery:
    """The queue and the thread that deliver one run's records (see the module doc)."""

    def __init__(
        self,
        tracking: TrackingConfig,
        *,
        uri: str,
        run_dir: Path,
        wal: st.WriteAheadLog,
        lease: st.RunDirLease,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None,
        settled: int,
        noted_steps: dict[str, int],
        multi_node: bool,
        on_run_opened: RunOpened,
    ) -> None:
        from pipeline.tracking import backend

        self._cfg, self._uri, self._run_dir = tracking, uri, run_dir
        self._wal, self._lease = wal, lease
        self._experiment, self._run_name, self._tags = experiment, run_name, dict(tags)
        self._multi_node, self._on_run_opened = multi_node, on_run_opened
        self._run_id, self._experiment_id = run_id, ""
        self._buffer = st.JsonlFile(run_dir / st.BUFFER_FILE)
        self._settled = self._recover_unsettled(settled)
        # The buffer's steps are recorded whichever run this delivery writes to.
        self.buffered_steps = st.last_steps(self._buffer.read())
        self._steps = st.merge_steps(noted_steps, self.buffered_steps)  # highest step per key, for tracking.json
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: list[dict[str, Any]] = []
        self._known_params: dict[str, str] = {}
        self._down = self._warned = self._abandoned = self._closing = False
        self._last_try = self._last_save = self._last_renew = 0.0
        self._ready = threading.Event()
        self._wake = threading.Event()  # set by finish(): stop gathering, deliver now
        self._store = backend.Store(uri)
        self._sysmetrics: Any = None
        self._thread = threading.Thread(target=self._work, name="tracking-writer", daemon=True)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def buffer_path(self) -> Path:
        return self._buffer.path

    def put(self, record: dict[str, Any]) -> None:
        """Queue one record (the caller has written it to the WAL first)."""
        self._queue.put(record)

    def start(self) -> None:
        """Start the thread and wait until it has opened the run or given up on the store for now."""
        self._thread.start()
        if not self._ready.wait(self._cfg.timeout_s if is_remote(self._uri) else LOCAL_OPEN_WAIT_S):
            self._warn_once(f"{self._uri} did not answer within {self._cfg.timeout_s:.0f} s at start")

    def begin_close(self, deadline: float) -> None:
        """The caller closes: no system-metrics monitor starts from now on, a running one stops (within
        5 s and ``deadline``, a ``time.monotonic()``), and an end-of-run record counts again."""
        self._closing = True
        if self._sysmetrics is not None:
            self._sysmetrics.stop(timeout_s=min(5.0, max(0.0, deadline - time.monotonic())))

    def finish(self, deadline: float, timeout_s: float) -> None:
        """Deliver what is queued until ``deadline`` (``time.monotonic()``; ``timeout_s`` for the
        message), then stop; what the store has not taken by then goes to the buffer file."""
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

    def undelivered(self) -> int:
        """How many records wait in the buffer file for the next tracker of this run."""
        return len(self._buffer.read())

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
        """Wait for a record, then let records gather for ``BATCH_WINDOW_S`` (cut short by finish()):
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
            self._on_run_opened(resumed.last_steps, True)
            self._steps = st.merge_steps(self._steps, resumed.last_steps)
            self._queue.put({"t": "g", "v": self._tags})  # e.g. the new requeue count
            log.info("tracking: resumed run %s in %s", self._run_id, self._uri)
        else:
            self._on_run_opened(self.buffered_steps, False)  # a new run: only what the buffer holds is recorded
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
        if self._cfg.system_metrics and not self._closing:
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
        self._warn_once(f"{self._uri} failed ({reason(exc)})")

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
        if self._sysmetrics is not None and not self._closing:
            self._sysmetrics.ensure_running()

    def _replay(self) -> None:
        """Send the buffer file in order; on a failure keep what is left (and anything appended since)."""
        from pipeline.tracking.backend import Rejected, plan_requests

        raw = self._buffer.read()
        if not raw:
            return
        # An end-of-run buffered by an earlier incarnation must not end the run this one resumes.
        records = self._filter_params([r for r in raw if r["t"] != "end" or self._closing])
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


_REASONS = re.compile(r"Connection refused|Read timed out|timed out|Name or service not known|error code \d+ != 200")


def reason(exc: BaseException) -> str:
    """The gist of an MLflow/urllib3 error (their messages run to several hundred characters)."""
    text = str(exc).strip()
    found = _REASONS.search(text)
    if found:
        return found.group(0)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _probe(uri: str, timeout_s: float) -> bool:
    from pipeline.tracking.backend import probe

    return probe(uri, timeout_s)
