"""SLURM's stop signals as flags the training loop polls.

* USR2 (pre-timeout or preemption, ``--signal=USR2@N``): save, then the launcher requeues.
* TERM (``scancel``, the time limit itself, node shutdown): the job is about to be killed, SIGKILL
  follows after SLURM's KillWait. Save if a checkpoint fits in that window, else stop without one.

The handlers only set flags: the ranks agree on them at the next step boundary (an all-reduce),
save a complete checkpoint together, and only then does the launcher act. The handlers installed
before ours (submitit's: requeue on USR2, ignore TERM) are kept for the launcher to call.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# SLURM's KillWait when the job was not told its cluster's value (SLURM's default).
DEFAULT_KILL_WAIT_S = 30.0
# Time kept after the save for marking the attempt and closing the MLflow run before SIGKILL.
FINISH_MARGIN_S = 1.0

_flag = threading.Event()
_term_at: float | None = None  # time.monotonic() of the first TERM
_previous: dict[int, Any] = {}  # kept after uninstall(): the launcher calls submitit's afterwards
_installed: set[int] = set()


def _handler(signum: int, frame: Any) -> None:
    if not _flag.is_set():
        log.warning("received %s: will save a checkpoint at the next step boundary", signal.Signals(signum).name)
    _flag.set()


def _term_handler(signum: int, frame: Any) -> None:
    global _term_at
    if _term_at is None:
        log.warning("received SIGTERM: the job is being stopped; deciding at the next step boundary whether to save")
        _term_at = time.monotonic()


def install(signum: int = signal.SIGUSR2) -> None:
    """Route ``signum`` (USR2) and TERM to the flags (main thread only); remember the previous handlers."""
    global _term_at
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: cannot install the %s handler", signal.Signals(signum).name)
        return
    for sig, handler in ((signum, _handler), (signal.SIGTERM, _term_handler)):
        current = signal.getsignal(sig)
        if current is not handler:
            _previous[sig] = current
        signal.signal(sig, handler)
        _installed.add(sig)
    _flag.clear()
    _term_at = None


def uninstall() -> None:
    """Put the previous handlers back (so a later USR2 reaches submitit again)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in sorted(_installed):
        handler = _previous.get(sig)
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _installed.clear()


def requested() -> bool:
    return _flag.is_set()


def request() -> None:
    """Ask for a save-and-stop as if the signal had arrived (tests, interactive use)."""
    _flag.set()


def terminate_requested() -> bool:
    return _term_at is not None


def seconds_since_terminate() -> float:
    return 0.0 if _term_at is None else time.monotonic() - _term_at


def previous_handler(signum: int = signal.SIGUSR2) -> Callable[..., Any] | int | None:
    """The handler that was installed before ours (e.g. submitit's requeue handler)."""
    return _previous.get(signum)


@dataclass(frozen=True)
class SaveDecision:
    save: bool
    reason: str


def save_fits(*, kill_wait_s: float, elapsed_s: float, last_save_s: float | None) -> SaveDecision:
    """Whether a checkpoint started now ends before SIGKILL (KillWait after the TERM).

    The estimate is the last save of this attempt, measured, with 50 % headroom (the disk may be
    busier now); without one, the save must start within the first half of the window.
    """
    left = kill_wait_s - elapsed_s - FINISH_MARGIN_S
    if last_save_s is None:
        fits = elapsed_s <= kill_wait_s / 2 - FINISH_MARGIN_S
        why = f"no save measured yet in this attempt; {left:.1f} s of KillWait {kill_wait_s:.0f} s left"
        return SaveDecision(fits, why)
    need = 1.5 * last_save_s
    verdict = "fits" if need <= left else "does not fit"
    why = f"a save takes ~{last_save_s:.2f} s (x1.5 = {need:.2f} s), {verdict} in {left:.1f} s"
    why += f" of KillWait {kill_wait_s:.0f} s left"
    return SaveDecision(need <= left, why)
