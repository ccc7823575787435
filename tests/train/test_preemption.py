"""Stop signals as flags: USR2 (save, requeue) and TERM (save only when it fits before SIGKILL)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.train import preemption
from pipeline.train.preemption import save_fits


def test_term_and_usr2_set_their_flags_and_uninstall_restores_the_handlers() -> None:
    seen: list[int] = []

    def before(signum: int, frame: object) -> None:  # stands in for submitit's handlers
        seen.append(signum)

    old = {s: signal.signal(s, before) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        preemption.install()
        assert not preemption.requested() and not preemption.terminate_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.terminate_requested() and not preemption.requested()
        assert 0.0 <= preemption.seconds_since_terminate() < 5
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert preemption.requested() and seen == []  # ours ran, not the previous ones
        preemption.uninstall()
        assert preemption.previous_handler() is before  # the launcher hands over to it afterwards
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        preemption.uninstall()
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.parametrize(
    ("elapsed", "last_save", "fits", "reason"),
    [
        (0.5, 0.3, True, "a save takes ~0.30 s (x1.5 = 0.45 s), fits in 3.5 s of KillWait 5 s left"),
        (0.5, 3.0, False, "a save takes ~3.00 s (x1.5 = 4.50 s), does not fit in 3.5 s of KillWait 5 s left"),
        (4.5, 0.1, False, "a save takes ~0.10 s (x1.5 = 0.15 s), does not fit in -0.5 s of KillWait 5 s left"),
        (1.0, None, True, "no save measured yet in this attempt; 3.0 s of KillWait 5 s left"),
        (2.0, None, False, "no save measured yet in this attempt; 2.0 s of KillWait 5 s left"),
    ],
)
def test_a_save_on_sigterm_must_end_before_sigkill(elapsed, last_save, fits, reason) -> None:
    decision = save_fits(kill_wait_s=5.0, elapsed_s=elapsed, last_save_s=last_save)
    assert (decision.save, decision.reason) == (fits, reason)
