"""The tags a run carries: where and how it ran, which code, and which pretraining run a fine-tune
starts from.

Pure functions (no mlflow import): the engine builds its tags here and the tracker sends them.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.tracking.state import read_tracking_state
from pipeline.tracking.uris import ui_run_path

# Tag keys the tracker and the fine-tune stage set (dotted like the params).
TAG_PRETRAIN_RUN_ID = "pretrain.run_id"
TAG_PRETRAIN_RUN_NAME = "pretrain.run_name"
TAG_PRETRAIN_EXPERIMENT_ID = "pretrain.experiment_id"
TAG_PRETRAIN_CHECKPOINT = "pretrain.checkpoint"  # what was loaded: the step dir, export or file
TAG_PRETRAIN_STEP_DIR = "pretrain.step_dir"  # only when a checkpoint step dir was loaded
TAG_PRETRAIN_STEP = "pretrain.step"
# MLflow's own tags: the run page's Description, Source and "Created by".
TAG_NOTE = "mlflow.note.content"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_USER = "mlflow.user"
# The entry points name themselves and their config file here (the ranks inherit it), for the Source tag.
SOURCE_ENV = "PIPELINE_SOURCE"
# MLflow 3's UI opens an experiment in its GenAI view unless this experiment tag says otherwise
# (the values are its ExperimentKind: "genai_development", "custom_model_development", ...).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


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
    tags.update(source_tags(env))
    tags.update(cfg.tracking.tags)
    return {k: v for k, v in tags.items() if v != ""}


def source_tags(env: dict[str, str]) -> dict[str, str]:
    """MLflow's Source and "Created by": the entry point and config file (``PIPELINE_SOURCE``, set by
    ``python -m pipeline.train`` and ``launch/submit.py``), and the user who started the job."""
    try:
        user = env.get("USER") or env.get("LOGNAME") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = ""
    return {
        TAG_SOURCE_NAME: env.get(SOURCE_ENV) or "python -m pipeline.train",
        TAG_SOURCE_TYPE: "JOB",
        TAG_USER: user,
    }


def source_name(entry: str, config: str | None) -> str:
    """What ``PIPELINE_SOURCE`` holds: ``launch/submit.py --config configs/pretrain/vit_b16.yaml``."""
    return f"{entry} --config {config}" if config else entry


def pretrain_tags(
    init_from: str | Path, *, loaded: str | Path | None = None, step: int | None = None
) -> dict[str, str]:
    """Tags linking a fine-tune run to the pretraining run it starts from.

    ``init_from`` is what ``finetune.init_from`` names: a run directory or a path inside one; the
    run's ``tracking.json`` is looked up there and in up to three parent folders. ``loaded`` is
    what was read (a run dir resolves to its newest ``checkpoints/step_*``); ``pretrain.checkpoint``
    names it, so it is always recorded, even for a pretraining run that was not tracked, and
    ``pretrain.step_dir`` repeats it when it is a checkpoint's step dir. A tracked pretraining run
    also gets a link in the run's description (``mlflow.note.content``, markdown), clickable in the UI.
    """
    checkpoint = Path(loaded if loaded is not None else init_from)
    tags = {TAG_PRETRAIN_CHECKPOINT: str(checkpoint)}
    if loaded is not None and checkpoint.name.startswith("step_"):
        tags[TAG_PRETRAIN_STEP_DIR] = str(checkpoint)
    if step is not None:
        tags[TAG_PRETRAIN_STEP] = str(step)
    here = Path(init_from).resolve()
    for folder in [here, *list(here.parents)[:3]]:
        state = read_tracking_state(folder)
        if state.get("run_id"):
            tags[TAG_PRETRAIN_RUN_ID] = state["run_id"]
            tags[TAG_PRETRAIN_RUN_NAME] = state.get("run_name", "")
            tags[TAG_PRETRAIN_EXPERIMENT_ID] = state.get("experiment_id", "")
            tags[TAG_NOTE] = pretrain_note(tags, step)
            break
    return {k: v for k, v in tags.items() if v}


def pretrain_note(tags: dict[str, str], step: int | None) -> str:
    """The fine-tune run's description: a link to its pretraining run and the checkpoint it loaded.

    The link is relative to the UI (``#/experiments/<id>/runs/<run_id>?...``): it opens the pretrain run
    in whichever MLflow UI shows this run, whatever host name the browser reaches it by."""
    name = tags.get(TAG_PRETRAIN_RUN_NAME) or tags[TAG_PRETRAIN_RUN_ID]
    link = ui_run_path(tags.get(TAG_PRETRAIN_EXPERIMENT_ID, ""), tags[TAG_PRETRAIN_RUN_ID])
    at = f" (step {step})" if step is not None else ""
    return (
        f"Fine-tuned from pretraining run [{name}]({link}).\n\nWeights loaded: `{tags[TAG_PRETRAIN_CHECKPOINT]}`{at}."
    )
