"""The two errors the data package raises on purpose."""

from __future__ import annotations


class DataError(RuntimeError):
    """Training cannot go on with this data (e.g. too many unreadable samples); the message says why."""


class PreflightError(ValueError):
    """The shard directory is not usable as configured; the message names the file and the fix."""
