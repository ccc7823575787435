"""The loaders' worker processes: started from a forkserver, deaf to the job's signals, gone with their trainer.

What runs inside a worker is the stream it is handed (:mod:`pipeline.data.train_stream`,
:mod:`pipeline.data.val`); this module owns how those processes start, which signals they take,
and how they end.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing as mp
import os
import select
import signal
import threading
import time
from multiprocessing import forkserver
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from pipeline.proc import pid_alive

# Workers start from a forkserver, a clean single-threaded process, not by forking the training
# process: by the time a loader starts its workers, that process runs threads (the tracker, gloo,
# queue feeders), and a fork taken while one of them holds an interpreter lock deadlocks the child
# (seen here: a val worker hung in PyOS_AfterFork_Child). The server preloads torch and the loader
# modules (pipeline.data.loader imports the streams a worker runs), so a worker starts in milliseconds.
FORKSERVER_PRELOAD = ("torch", "pipeline.data.loader")
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(list(FORKSERVER_PRELOAD))

# Set by the training process once it shuts its workers down; passed to every worker. Made on first
# use, so that importing this module (the forkserver preloads it) creates no semaphore.
_SHUTTING_DOWN: Any = None


# What SLURM sends every process of a job step (scancel --signal, preemption, the pre-timeout signal).
_JOB_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}


def shutdown_event() -> Any:
    """The shutdown event, made together with the forkserver, both with the job's signals blocked.

    The forkserver and multiprocessing's resource tracker are helper processes of this one, and SLURM
    signals them too. A forkserver killed by SIGTERM or USR2 takes every worker with it (a worker
    exits once its parent is gone), so the rank would crash just as it should save. A blocked
    signal mask survives fork and exec, so both helpers start with these signals held pending for
    good; this process's handlers are untouched, and a signal sent meanwhile reaches them once the
    block ends. The workers unblock them again (worker_signals).
    """
    global _SHUTTING_DOWN
    if _SHUTTING_DOWN is None:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
        try:
            event = _CONTEXT.Event()  # starts the resource tracker (the event's semaphore) ...
            signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)  # ... whose start unblocks SIGTERM
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _SHUTTING_DOWN = event
    return _SHUTTING_DOWN


def _on_worker_sigterm(shutting_down: Any) -> Any:
    def handler(signum: int, frame: object) -> None:
        if shutting_down.is_set():
            os._exit(0)  # the training process is stopping its workers (DataLoader shutdown, exit)

    return handler


def worker_signals(worker_id: int, shutting_down: Any, trainer_pid: int | None = None) -> None:
    """DataLoader workers survive the job's signals; only their own training process ends them.

    SLURM signals every process of a job step. A worker that died on SLURM's SIGTERM (which
    submitit ignores in the main process) would crash the rank before it could save on the USR2
    that follows; one that inherited the requeue handler could requeue the job itself. So workers
    ignore USR2, and exit on SIGTERM only once their training process has begun shutting them down,
    or once that process is gone (``trainer_pid``: see _exit_with).
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_worker_sigterm(shutting_down))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)  # inherited blocked from the forkserver
    if trainer_pid is not None:
        threading.Thread(target=_exit_with, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this worker as soon as process ``pid`` (its training process) has ended, however it ended.

    torch's own check compares the worker's parent with the one it started under, and a worker's
    parent is the forkserver, not the training process. A SIGKILLed rank (torchrun stopping a
    failed job, the OOM killer) therefore left its workers running, and they in turn kept the
    forkserver and the resource tracker alive (each holds the pipes whose closing ends those two):
    three orphans per rank, holding the job's stdout open so that whoever waits for its end waits
    forever. A pidfd becomes readable when its process exits, without polling.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)  # gone before this worker started
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        while pid_alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def data_loader(stream: IterableDataset, workers: int, prefetch_factor: int) -> DataLoader:
    """The DataLoader both loaders run: batches come made from the stream, workers stay for the run."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {
            "multiprocessing_context": _CONTEXT,
            "worker_init_fn": functools.partial(
                worker_signals, shutting_down=shutdown_event(), trainer_pid=os.getpid()
            ),
            "persistent_workers": True,  # evaluation runs many times: keep its workers
            "prefetch_factor": prefetch_factor,
        }
    return DataLoader(
        stream,
        batch_size=None,  # batches are made inside the workers
        num_workers=workers,
        pin_memory=False,  # the float32 images are written into pinned memory by Normalize
        **options,
    )


@atexit.register
def _release_workers() -> None:
    # Runs before multiprocessing's exit hook (atexit is last-in, first-out), which SIGTERMs and
    # joins the remaining workers: they must take that SIGTERM.
    if _SHUTTING_DOWN is not None:
        _SHUTTING_DOWN.set()
