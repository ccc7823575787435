"""SLURM's pre-timeout/preemption signal (USR2) as a flag the training loop polls.

The handler only sets a flag: the ranks agree on it at the next step boundary (an all-reduce),
save a complete checkpoint together, and only then does the launcher requeue. The handler that
was installed before ours (submitit's, which requeues) is kept for the launcher to call.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_flag = threading.Event()
_previous: Any = None
_signum: int | None = None


def _handler(signum: int, frame: Any) -> None:
    if not _flag.is_set():
        log.warning("received %s: will save a checkpoint at the next step boundary", signal.Signals(signum).name)
    _flag.set()


def install(signum: int = signal.SIGUSR2) -> None:
    """Route ``signum`` to the flag (main thread only); remember the previous handler."""
    global _previous, _signum
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: cannot install the %s handler", signal.Signals(signum).name)
        return
    current = signal.getsignal(signum)
    if current is not _handler:
        _previous, _signum = current, signum
    signal.signal(signum, _handler)
    _flag.clear()


def uninstall() -> None:
    """Put the previous handler back (so a later USR2 reaches submitit again)."""
    global _signum
    if _signum is not None and threading.current_thread() is threading.main_thread():
        signal.signal(_signum, _previous if _previous is not None else signal.SIG_DFL)
        _signum = None


def requested() -> bool:
    return _flag.is_set()


def request() -> None:
    """Ask for a save-and-stop as if the signal had arrived (tests, interactive use)."""
    _flag.set()


def previous_handler() -> Callable[..., Any] | int | None:
    """The handler that was installed before ours (e.g. submitit's requeue handler)."""
    return _previous
