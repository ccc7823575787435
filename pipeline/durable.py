"""fsync of a file or a directory: the bottom of every durable write (checkpoints, shard data sets).

A leaf module so that the data layer and the training layer share it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
