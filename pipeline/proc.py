"""Is a process on this host still alive? One rule for the launcher, the run-dir lease and the tracker lock.

A zombie (exited, not yet reaped by its parent) counts as gone: a job controller whose launcher has
exited is re-parented, and in containers whose PID 1 reaps late it can linger as a zombie for
minutes, during which ``os.kill(pid, 0)`` still succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone
    or a zombie. Compared with a recorded value it tells a reused PID from the original process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def pid_alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, when ``start`` is given, is the process that started then."""
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        now = pid_start(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc (not Linux): the signal-0 probe, zombies included
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
