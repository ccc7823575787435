"""Which config keys are a run's recipe (what it trains) and which only say where, how fast or how
often it runs; and the label that names a run by its recipe overrides.

One rule, three users: the default run dir (:func:`pipeline.config.schema.default_run_dir`, filled
by the loader) and the MLflow run name (pipeline/tracking/run_names.py) are the config name plus the
recipe overrides, so two submits that differ in ``optim.lr`` never share a run dir; and a resume
(pipeline/train/resume.py) refuses a recipe change, so a run dir never holds two recipes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Keys that never change the trained weights: where and how fast the run executes, how often it
# logs, evaluates and saves, and how it is measured.
_EXECUTION_PREFIXES = ("tracking.", "launch.", "checkpoint.")
_EXECUTION_KEYS = frozenset({
    "name", "family", "train.run_dir", "train.log_every", "train.eval_every", "train.peak_tflops", "train.cpu_threads",
    "train.device", "train.compile", "train.max_nonfinite_steps", "train.offload_optimizer", "train.offload_params",
    "finetune.export_best", "data.val_split", "data.val_batch_size", "data.eval_crop_pct", "data.prefetch_factor",
    "data.max_skip_frac", "data.skip_check_after", "data.num_workers", "model.grad_checkpointing",
    "model.recompute", "model.recompute_every",
})  # fmt: skip
# Launch keys that shape a fresh run's global batch (ranks x micro batch x accumulation) unless
# train.global_batch_size pins it; a resume keeps the checkpoint's global batch instead.
_WORLD_SIZE_KEYS = frozenset({"launch.nodes"})


def changes_recipe(key: str) -> bool:
    """Whether a different value of dotted ``key`` makes a different run (its weights, not its speed)."""
    if key in _WORLD_SIZE_KEYS:
        return True
    return not (key in _EXECUTION_KEYS or key.startswith(_EXECUTION_PREFIXES))


# Short labels for the overrides that usually distinguish runs; other keys use their last part.
_LABELS = {
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
    "finetune.init_from": "from_",
    "data.path": "data_",
    "data.mixup_alpha": "mixup",
    "data.cutmix_alpha": "cutmix",
    "data.label_smoothing": "ls",
}
# Path values name the run by their last part (data.path=/shards/digits -> data_digits).
_PATH_KEYS = frozenset({"data.path", "finetune.init_from"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def run_label(name: str, overrides: Sequence[str]) -> str:
    """``vit_b16-lr3e-4-zero2``: the config name plus the ``key=value`` overrides that change the recipe.

    Values keep the user's spelling (``3e-4`` stays ``3e-4``) so the label reads like the command
    line that made it; a plain resubmit of the same command gets the same label.
    """
    parts = [_UNSAFE.sub("", name) or "run"]
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not changes_recipe(key):
            continue
        label = _LABELS.get(key, key.rpartition(".")[2])
        raw = raw.strip().strip("\"'")
        raw = raw.rstrip("/").rpartition("/")[2] if key in _PATH_KEYS else raw.replace("/", "")
        value = _UNSAFE.sub("", raw)
        if value:
            parts.append(f"{label}{value}")
    return "-".join(parts)
