"""One logging set-up for every entry point: rank 0 speaks at INFO, other ranks only warn.

A job's log starts with our own lines: :func:`announce_start` says the rank is up before torch
and DeepSpeed load (10-30 s on a busy machine), and :class:`StartupPhases` says each start-up
phase with its time as it ends. Known third-party start-up noise is kept out of the log (a rank
has no other log file to demote it to): see ``_NOISE``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

# logger name (and its children) -> message fragments dropped from the job's log ("": all of them).
_NOISE: dict[str, tuple[str, ...]] = {
    # setuptools' compiler logs every gcc command line of DeepSpeed's op-builder probes (libaio) at INFO
    "compilers": ("",),
    "distutils": ("",),
    # torch on a machine without a CUDA toolkit; DeepSpeed when it finds no GPU (train.device says which)
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# Deprecation notices that torch and DeepSpeed raise inside their own code, not ours.
_FUTURE_WARNING_MODULES = r"(torch|deepspeed)(\.|$)"

_started = time.monotonic()  # the rank's start: reset by announce_start, which entry points call first
startup_log = logging.getLogger("pipeline.startup")


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    fmt = "%(asctime)s %(levelname).1s [rank %(rank)s] %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    handler.addFilter(_NoiseFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    # DeepSpeed and MLflow are chatty at INFO; their warnings still show.
    for name in ("DeepSpeed", "deepspeed", "mlflow", "urllib3", "alembic", "torch.distributed"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # DeepSpeed and torch print through handlers of their own: filter at the loggers themselves.
    for name in ("DeepSpeed", "torch.utils.cpp_extension"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
            logger.addFilter(_NoiseFilter())
    warnings.filterwarnings("ignore", category=FutureWarning, module=_FUTURE_WARNING_MODULES)
    # submitit's logger prints through its own handler; passing records on would print them twice.
    logging.getLogger("submitit").propagate = False
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def announce_start(rank: int, what: str) -> None:
    """The rank's first line, before the heavy imports; starts the clock of :class:`StartupPhases`.

    Call it before importing torch: the noise filters must be in place when torch and DeepSpeed load.
    """
    global _started
    _started = time.monotonic()
    setup_logging(rank)
    startup_log.info("start-up: %s", what)


class StartupPhases:
    """Each start-up phase said as it ends, with its time: ``start-up: engine in 3.2 s (ZeRO-2 ...)``.

    The first phase counts from :func:`announce_start`, so the imports show in it.
    """

    def __init__(self) -> None:
        self._last = _started
        self._carried: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Time spent since the last line belongs to ``phase``, said later (by :meth:`done`)."""
        now = time.monotonic()
        self._carried[phase] = self._carried.get(phase, 0.0) + now - self._last
        self._last = now

    def done(self, phase: str, detail: str = "") -> None:
        now = time.monotonic()
        took = self._carried.pop(phase, 0.0) + now - self._last
        self._last = now
        startup_log.info("start-up: %s in %.1f s%s", phase, took, f" ({detail})" if detail else "")

    def total(self) -> float:
        return time.monotonic() - _started


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, fragments in _NOISE.items():
            if record.name == name or record.name.startswith(name + "."):
                message = record.getMessage()
                return not any(f in message for f in fragments)
        return True


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True
