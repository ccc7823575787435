"""Names that make runs comparable: run names, experiments, URIs, tags and UI links (metric keys:
pipeline/metric_names.py).

Nothing here talks to MLflow; these are pure functions over the config and the environment,
so the launcher and the compare CLI can use them without importing mlflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config, TrackingConfig

# Tag keys the tracker and the fine-tune stage set (dotted like the params).
TAG_PRETRAIN_RUN_ID = "pretrain.run_id"
TAG_PRETRAIN_RUN_NAME = "pretrain.run_name"
TAG_PRETRAIN_EXPERIMENT_ID = "pretrain.experiment_id"
TAG_PRETRAIN_CHECKPOINT = "pretrain.checkpoint"

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

TRACKING_STATE_FILE = "tracking.json"


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


def default_tracking_uri(tracking: TrackingConfig, run_dir: str | Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir parent>/mlflow.db``.

    The local store sits beside the run directories, so every run under one root shares one
    store (and one ``mlflow ui``) with no server.
    """
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return sqlite_uri(Path(run_dir).resolve().parent / "mlflow.db")


def sqlite_uri(db_file: str | Path) -> str:
    """``sqlite:////abs/path.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + str(Path(db_file).resolve())


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the code that runs (``""`` outside a git checkout)."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_tags(cfg: Config, *, world_size: int, num_nodes: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The tags every run carries: where it ran (SLURM job, nodes), how (world size, ZeRO stage),
    which code (git commit) and how often it was requeued. ``tracking.tags`` are added last.

    ``world_size`` and ``num_nodes`` come from the caller's distributed environment (the one seam
    that reads rank variables); ``env`` (default: this process's) only names the job."""
    env = dict(os.environ) if env is None else env
    commit = git_commit()
    tags = {
        "slurm.job_id": env.get("SLURM_JOB_ID", ""),
        "slurm.nodelist": env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")),
        "slurm.nodes": str(num_nodes),
        "nodes": str(num_nodes),
        # the launcher's count (local executor included), else SLURM's
        "slurm.restart_count": env.get("PIPELINE_REQUEUE_COUNT", env.get("SLURM_RESTART_COUNT", "0")),
        "world_size": str(world_size),
        "zero_stage": str(cfg.train.zero_stage),
        "git.commit": commit,
        "config.name": cfg.name,
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI on the run page
    tags.update(cfg.tracking.tags)
    return {k: v for k, v in tags.items() if v != ""}


def read_tracking_state(run_dir: str | Path) -> dict[str, Any]:
    """The ``tracking.json`` of a run directory (``{}`` if there is none)."""
    path = Path(run_dir) / TRACKING_STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pretrain_tags(init_from: str | Path) -> dict[str, str]:
    """Tags linking a fine-tune run to the pretraining run it starts from.

    ``init_from`` is a run directory or a path inside one (a checkpoint or export); the run's
    ``tracking.json`` is looked up there and in up to three parent folders. The checkpoint path
    is always recorded, so the link survives even a pretraining run that was not tracked.
    """
    tags = {TAG_PRETRAIN_CHECKPOINT: str(init_from)}
    here = Path(init_from).resolve()
    for folder in [here, *list(here.parents)[:3]]:
        state = read_tracking_state(folder)
        if state.get("run_id"):
            tags[TAG_PRETRAIN_RUN_ID] = state["run_id"]
            tags[TAG_PRETRAIN_RUN_NAME] = state.get("run_name", "")
            tags[TAG_PRETRAIN_EXPERIMENT_ID] = state.get("experiment_id", "")
            break
    return {k: v for k, v in tags.items() if v}


def ui_runs_url(base_url: str, experiment_id: str) -> str:
    """The runs table of one experiment (``#/experiments/<id>`` alone opens an overview page)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"


def ui_run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_compare_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's compare page: ``#/compare-runs?runs=[...]&experiments=[...]`` (URL-encoded JSON)."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps(sorted(set(experiment_ids)), separators=(",", ":")))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"
