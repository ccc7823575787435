"""Durable writes: the one way this code base replaces a file, and the fsync under it.

The rule, for every file written in place (checkpoint markers and state, the run-dir lease,
``tracking.json``, the tracker's buffer, ``job.json``, the data index, the server URL file, exports):

1. write a temporary file in the target's own directory (a rename is atomic only within one
   filesystem);
2. fsync the temporary file (without it a crash after the rename can leave the final name pointing
   at an empty or half-written file: filesystems may write the directory entry before the data);
3. rename it over the target (readers see the old file or the new one, never part of one);
4. fsync the directory (the rename is a change to the directory; until that is on disk a crash or
   power loss can bring the old file back, e.g. a checkpoint's COMMITTED marker that vanishes).

A crash or power loss therefore never leaves a half-written file under the final name, and a
rename, once this returns, survives one. The files are small (JSON records, markers, a URL; the
exported weights once per export), so the two fsyncs cost milliseconds, and one rule everywhere is
simpler to trust than a cheaper variant per caller. A write that fails (an exception, Ctrl-C) removes
its temporary file and leaves the old file as it was.

Temporary names start with "." (hidden: the checkpoint checksum walk skips them) and carry the pid
and a random token, so concurrent writers of one file never share a temporary file.

A leaf module (standard library only), so that the data, tracking, training and launch layers share
it without importing each other.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for writing its next version."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) by the rule in the module docstring."""
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(raw)

    atomic_write_via(path, write)


def atomic_write_via(path: str | Path, write: Callable[[Path], None]) -> None:
    """Replace ``path`` with what ``write(tmp)`` puts into the file ``tmp`` (for writers that want
    a file name, e.g. ``safetensors.torch.save_file``); same rule as :func:`atomic_write`."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
