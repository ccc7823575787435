"""What a run and its experiment are called, so that runs of one recipe compare side by side.

Pure functions over the config (no mlflow import); the engine names its run with them and the
compare tests find runs by the same names.
"""

from __future__ import annotations

import re

from pipeline.config.schema import Config

# Short labels for the overrides that usually distinguish runs; other keys use their last part.
_OVERRIDE_LABELS = {
    "optim.lr": "lr",
    "optim.min_lr": "minlr",
    "optim.weight_decay": "wd",
    "optim.warmup_steps": "warmup",
    "optim.schedule": "",
    "train.zero_stage": "zero",
    "train.global_batch_size": "bs",
    "train.micro_batch_size": "mbs",
    "train.grad_accum": "accum",
    "train.precision": "",
    "train.steps": "steps",
    "train.seed": "seed",
    "launch.nodes": "n",
    "model.preset": "",
    "model.drop_path_rate": "dpr",
    "finetune.layer_decay": "ld",
    "data.mixup_alpha": "mixup",
    "data.cutmix_alpha": "cutmix",
    "data.label_smoothing": "ls",
}
# Overrides that say where or how a run is tracked or launched, not what it trains.
_NOT_IN_NAME = ("tracking.", "launch.", "train.run_dir", "data.path", "data.num_workers", "checkpoint.", "name")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def run_name_for(cfg: Config, overrides: list[str]) -> str:
    """``vit_b16-lr3e-4-zero2``: the config name plus the overrides that change the recipe.

    ``tracking.run_name`` wins when set. Values keep the user's spelling (``3e-4`` stays
    ``3e-4``) so the name reads like the command line that made it.
    """
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    parts = [_UNSAFE.sub("", cfg.name) or "run"]
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or _skip_in_name(key):
            continue
        label = _OVERRIDE_LABELS.get(key, key.rpartition(".")[2])
        value = _UNSAFE.sub("", raw.strip().replace("/", ""))
        if value:
            parts.append(f"{label}{value}")
    return "-".join(parts)


def _skip_in_name(key: str) -> bool:
    if key == "launch.nodes":
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in _NOT_IN_NAME)


def experiment_for(cfg: Config) -> str:
    """The experiment of a config family: ``tracking.experiment`` (the loader fills it with the
    config's folder, e.g. ``pretrain``), else ``default``."""
    return cfg.tracking.experiment or "default"
