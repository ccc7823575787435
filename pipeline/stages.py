"""Which stage a config trains: the one place that knows every stage (above the engine and the stages)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.train.stage import Classification, Stage, pretraining


def stage_for(cfg: Config) -> Stage:
    """Fine-tuning when ``finetune.init_from`` is set, MAE pretraining for ``train.objective=mae``,
    else classification pretraining."""
    if cfg.train.objective == "mae":
        from pipeline.mae.stage import MAEPretraining

        return MAEPretraining(cfg)
    if cfg.finetune.enabled:
        from pipeline.finetune.stage import FineTune  # loads the export/DeepSpeed readers only when fine-tuning

        return FineTune(cfg)
    return pretraining(cfg)


__all__ = ["Classification", "Stage", "stage_for"]
