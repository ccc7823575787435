"""One job per run dir: an atomic lease file ``<run_dir>/lease.json``, independent of tracking.

Life of a lease::

    launcher   takes it BEFORE submitting (the check and the claim are one atomic step), then
               records the job id it got; nothing is queued when the lease is held by another
    job        rank 0 adopts it (same token, passed in the job) or takes it (a run started by hand),
               refreshes its heartbeat every HEARTBEAT_S from a thread, releases it at the end;
               keeps it when stopping for a requeue (the requeued job adopts it again)

Taking it is ``link(2)`` of a fully written temporary file onto ``lease.json``: atomic on local
file systems and on NFS (every version; O_CREAT|O_EXCL is only atomic from NFSv3 on, and its
content would be written after the create, so a reader could see an empty lease) and Lustre.
When an NFS reply is lost the link may have happened yet report an error: the temporary file's
link count (2) tells the truth, the way liblockfile does it.

A lease is stale, and is taken over with a message, when its holder is gone: the SLURM job has
ended (squeue/sacct, from the launcher), or its process on this host has died (pid and the
process's start time, so a reused pid is not mistaken for it). Where neither can be checked
(another host, no SLURM tools) it is stale once its heartbeat is older than STALE_AFTER_S. A
holder that is checkably alive is never stale, whatever its heartbeat (a requeued job waiting
in the queue does not beat).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from pipeline.durable import atomic_write
from pipeline.proc import pid_alive, pid_start

log = logging.getLogger(__name__)

LEASE = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: a slow shared file system must not look like a dead job
TOKEN_ENV = "PIPELINE_LEASE_TOKEN"  # set by the launcher's job so that its ranks adopt the lease
JOB_ID_ENV = "PIPELINE_JOB_ID"
EXECUTOR_ENV = "PIPELINE_EXECUTOR"

# job id -> True (queued/running), False (ended), None (cannot tell)
JobProbe = Callable[[str], "bool | None"]


class RunDirBusy(RuntimeError):
    """Another live job (or launcher) holds the run dir."""


@dataclass(frozen=True)
class Holder:
    token: str
    role: Literal["launcher", "job"]
    user: str
    host: str
    pid: int | None
    pid_start: str | None
    executor: str  # "slurm", "local" (submitit's local executor: job id = its controller's pid) or "none"
    job_id: str | None
    since: float
    heartbeat: float

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.job_id:
            job = f"job {self.job_id} ({self.executor})"
        else:
            job = "a launch not yet submitted" if self.role == "launcher" else "a run started without a scheduler"
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return (
            f"{job} of user {self.user} on host {self.host} (pid {self.pid}), since {since}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )


def new_token() -> str:
    return uuid.uuid4().hex


def this_process(token: str, role: Literal["launcher", "job"], *, executor: str = "none", job_id: str | None = None,
                 since: float | None = None) -> Holder:  # fmt: skip
    now = time.time()
    pid = os.getpid()
    return Holder(
        token=token, role=role, user=getpass.getuser(), host=socket.gethostname(), pid=pid, pid_start=pid_start(pid),
        executor=executor, job_id=job_id, since=since or now, heartbeat=now,
    )  # fmt: skip


def read(run_dir: Path) -> Holder | None:
    """The current lease, None when there is none. A lease that cannot be parsed counts as held
    by an unknown holder whose heartbeat is the file's modification time."""
    path = Path(run_dir) / LEASE
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return Holder("?", "job", "?", "?", None, None, "none", None, mtime, mtime)


def holder_gone(h: Holder, probe: JobProbe | None = None) -> bool | None:
    """True/False when it can be checked from here, None when it cannot."""
    if h.executor == "slurm" and h.job_id:
        # A SLURM job's own word counts, not its rank 0's pid: between a requeue and the restart no process runs.
        return None if probe is None or (active := probe(h.job_id)) is None else not active
    if h.host != socket.gethostname():
        return None
    pids = [(h.pid, h.pid_start)] if h.pid else []
    if h.executor == "local" and (h.job_id or "").isdigit():
        pids.append((int(h.job_id), None))  # submitit's local controller; it outlives a requeue
    return not any(pid_alive(pid, start) for pid, start in pids) if pids else None


def stale_reason(h: Holder, probe: JobProbe | None = None, now: float | None = None) -> str | None:
    """Why ``h`` may be taken over, or None while it must be respected."""
    now = time.time() if now is None else now
    gone = holder_gone(h, probe)
    if gone:
        return "its job has ended" if h.executor == "slurm" else f"its process (pid {h.pid}) on {h.host} is gone"
    if gone is None and now - h.heartbeat > STALE_AFTER_S:
        return (
            f"no heartbeat for {now - h.heartbeat:.0f} s (> {STALE_AFTER_S:.0f} s) and its job cannot be checked here"
        )
    return None


def _link_new(path: Path, h: Holder) -> bool:
    """Create ``path`` holding ``h`` atomically; False if it exists."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{h.token[:8]}")
    atomic_write(tmp, json.dumps(asdict(h), indent=1))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        return os.stat(tmp).st_nlink == 2  # NFS: the link may have been made though the reply was lost
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if(path: Path, token: str) -> bool:
    """Remove the lease if it still holds ``token``; never removes another holder's fresh lease."""
    aside = path.with_name(f".{path.name}.stale.{new_token()}")
    try:
        os.rename(path, aside)  # atomic: of two removers only one moves the file
    except FileNotFoundError:
        return True
    try:
        moved = Holder(**json.loads(aside.read_text()))
        ours = moved.token == token
    except (ValueError, TypeError):
        ours = token == "?"
    if not ours:
        try:  # we moved a lease taken in between: put it back
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
    return ours


def acquire(run_dir: Path, h: Holder, *, probe: JobProbe | None = None, force: bool = False) -> str | None:
    """Take (or, with the same token, adopt) the lease of ``run_dir``; returns a note when a stale
    lease was taken over. Raises RunDirBusy naming the holder and the fix."""
    path = Path(run_dir) / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    note = None
    for _ in range(5):
        if _link_new(path, h):
            return note
        current = read(run_dir)
        if current is None:
            continue  # released in between
        if current.token == h.token:
            atomic_write(path, json.dumps(asdict(replace(h, since=current.since)), indent=1))
            return "adopted the lease taken by the launcher"
        why = "--force-unlock" if force else stale_reason(current, probe)
        if why is None:
            raise RunDirBusy(
                f"run dir {run_dir} is in use by {current.describe()} ({path}). Wait for that job to end, cancel it "
                f"({_cancel_hint(current)}), or, if you are sure nothing runs there, launch with --force-unlock"
            )
        if _remove_if(path, current.token):
            note = f"took over the lease of {run_dir} from {current.describe()}: {why}"
            log.warning(note)
    raise RunDirBusy(f"the lease {path} kept changing hands while taking it over; try again")


def _cancel_hint(h: Holder) -> str:
    if h.executor == "slurm" and h.job_id:
        return f"`scancel {h.job_id}`"
    return f"`kill {h.job_id if h.executor == 'local' and h.job_id else h.pid}` on {h.host}"


def update(run_dir: Path, h: Holder) -> bool:
    """Rewrite the lease as ``h`` if it is still ours (same token); False if it was taken over."""
    current = read(run_dir)
    if current is None or current.token != h.token:
        return False
    atomic_write(Path(run_dir) / LEASE, json.dumps(asdict(h), indent=1))
    return True


def release(run_dir: Path, token: str) -> bool:
    """Remove the lease if it is ours."""
    current = read(run_dir)
    return current is not None and current.token == token and _remove_if(Path(run_dir) / LEASE, token)


class HeldLease:
    """The running job's lease (rank 0): a heartbeat thread, released or kept at the end."""

    def __init__(self, run_dir: Path, holder: Holder, every_s: float = HEARTBEAT_S) -> None:
        self.run_dir, self.holder = Path(run_dir), holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.holder = replace(self.holder, heartbeat=time.time())
            try:
                if not update(self.run_dir, self.holder):
                    log.error("the lease of %s was taken over by another launch; this job no longer holds it",
                              self.run_dir)  # fmt: skip
                    return
            except OSError as e:  # a hiccup of the file system: try again at the next beat
                log.warning("could not refresh the lease of %s: %s", self.run_dir, e)

    def end(self, status: str) -> None:
        """FINISHED/FAILED: release. KILLED (stopped for a requeue): keep it for the next attempt."""
        self._stop.set()
        self._thread.join(timeout=10)
        if status == "KILLED":
            log.info("keeping the lease of %s for the requeued job", self.run_dir)
        else:
            release(self.run_dir, self.holder.token)


_held: HeldLease | None = None  # one run dir per process


def hold_for_job(run_dir: Path, every_s: float = HEARTBEAT_S) -> HeldLease:
    """Rank 0 of a job: adopt the launcher's lease (token in the environment) or take it; refuse
    (RunDirBusy) when another live job holds the run dir."""
    global _held
    token = os.environ.get(TOKEN_ENV) or new_token()
    executor = os.environ.get(EXECUTOR_ENV, "none")
    h = this_process(token, "job", executor=executor, job_id=os.environ.get(JOB_ID_ENV) or None)
    note = acquire(run_dir, h, probe=None)
    if note:
        log.info("%s", note)
    _held = HeldLease(run_dir, read(run_dir) or h, every_s)
    return _held


def end_held(status: str) -> None:
    """End this process's lease, if it holds one (see HeldLease.end)."""
    global _held
    if _held is not None:
        _held.end(status)
        _held = None
