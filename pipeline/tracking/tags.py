"""The tags a run carries: where and how it ran, which code, and which pretraining run a fine-tune
starts from.

Pure functions (no mlflow import): the engine builds its tags here and the tracker sends them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.tracking.state import read_tracking_state

# Tag keys the tracker and the fine-tune stage set (dotted like the params).
TAG_PRETRAIN_RUN_ID = "pretrain.run_id"
TAG_PRETRAIN_RUN_NAME = "pretrain.run_name"
TAG_PRETRAIN_EXPERIMENT_ID = "pretrain.experiment_id"
TAG_PRETRAIN_CHECKPOINT = "pretrain.checkpoint"


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
