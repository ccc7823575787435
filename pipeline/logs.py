"""One logging set-up for every entry point: rank 0 speaks at INFO, other ranks only warn."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    fmt = "%(asctime)s %(levelname).1s [rank %(rank)s] %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    # DeepSpeed and MLflow are chatty at INFO; their warnings still show.
    for name in ("DeepSpeed", "deepspeed", "mlflow", "urllib3", "alembic", "torch.distributed"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # submitit's logger prints through its own handler; passing records on would print them twice.
    logging.getLogger("submitit").propagate = False
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True
