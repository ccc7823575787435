"""pipeline.proc: the one rule for "is that process still alive" (launcher, run-dir lease, tracker lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pipeline.proc import pid_alive, pid_start


def test_a_zombie_counts_as_gone_and_a_running_process_as_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_start(child.pid) is not None:  # exited but not reaped by us yet: a zombie
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())


def test_a_reused_pid_with_another_start_time_is_not_the_recorded_process() -> None:
    mine = pid_start(os.getpid())
    assert mine is not None and pid_alive(os.getpid(), mine)
    assert not pid_alive(os.getpid(), str(int(mine) + 1))
    assert not pid_alive(0) and not pid_alive(-1)
