"""What a run and its experiment are called, so that runs of one recipe compare side by side.

Pure functions over the config (no mlflow import); the engine names its run with them and the
compare tests find runs by the same names.
"""

from __future__ import annotations

from pipeline.config.recipe import run_label
from pipeline.config.schema import Config


def run_name_for(cfg: Config, overrides: list[str]) -> str:
    """``vit_b16-lr3e-4-zero2``: the config name plus the overrides that change the recipe, the same
    label as the default run dir's (pipeline.config.recipe.run_label). ``tracking.run_name`` wins."""
    return cfg.tracking.run_name or run_label(cfg.name, overrides)


def experiment_for(cfg: Config) -> str:
    """``tracking.experiment``, else the config's family (its folder, e.g. ``pretrain``: one
    experiment per family, so a family's runs compare side by side), else ``default``."""
    return cfg.tracking.experiment or cfg.family or "default"
