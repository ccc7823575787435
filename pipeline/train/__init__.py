"""The training engine: `python -m pipeline.train --config C [a.b=v ...]`, once per rank."""

from pipeline.train.loop import NonFiniteError, TrainResult, run

__all__ = ["NonFiniteError", "TrainResult", "run"]
