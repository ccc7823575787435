"""Crash-safe checkpoint bookkeeping around DeepSpeed's sharded saves.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed's shards (every rank writes its own)
        trainer_state.json    step, samples seen, data position, run id, config (rank 0)
        rng_rank{r}.pt        each rank's RNG states
        loader_rank{r}.json   each rank's data position and skipped-sample counts
        COMMITTED             written last, atomically, after a barrier: the checkpoint counts
    latest                    "step_00000100", replaced atomically after the commit

DeepSpeed itself writes ``latest`` before the other ranks' shards exist and, when it is
missing, silently starts fresh (see the notes on DeepSpeed's code); we never let it write
``latest``, always pass the tag ourselves, and verify the marker's file list before loading.
This module does file bookkeeping only; the collective save/load lives in the engine seam.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
LATEST = "latest"
STATE = "trainer_state.json"
TAG_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """No loadable checkpoint where one is expected, or one that does not fit this run."""


@dataclass(frozen=True)
class ResumeInfo:
    tag: str
    path: Path
    step: int
    samples_seen: int
    world_size: int
    zero_stage: int
    marker: dict


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """tmp + fsync + rename + directory fsync: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves.

    Every rank calls this on the shared tag dir; another rank's temporary file may vanish under
    the walk (it is renamed into place and flushed by its writer), so missing files are skipped.
    """
    for root, _, files in os.walk(path):
        for name in files:
            if not name.startswith("."):
                try:
                    fsync_path(Path(root) / name)
                except FileNotFoundError:
                    pass
        fsync_path(Path(root))


def _tag_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[5:].isdigit()]
    return sorted(tags, key=lambda p: int(p.name[len(TAG_PREFIX) :]))


def _files(tag_dir: Path) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(tag_dir):
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(tag_dir).as_posix()
            if rel != MARKER and not name.startswith("."):
                out[rel] = p.stat().st_size
    return out


def commit(tag_dir: Path, info: dict[str, Any]) -> int:
    """Write the commit marker (rank 0, after every rank's files are flushed) and move ``latest``.

    Returns the bytes the marker lists (the checkpoint's size).
    """
    marker = dict(info, tag=tag_dir.name, files=_files(tag_dir), committed_at=time.time())
    atomic_write(tag_dir / MARKER, json.dumps(marker, indent=1, sort_keys=True))
    atomic_write(tag_dir.parent / LATEST, tag_dir.name)
    return sum(marker["files"].values())


def verify(tag_dir: Path) -> dict | None:
    """The marker if ``tag_dir`` is complete (marker present, every listed file at its size)."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    for rel, size in marker.get("files", {}).items():
        p = tag_dir / rel
        if not p.is_file() or p.stat().st_size != size:
            log.warning("checkpoint %s is damaged: %s is missing or has the wrong size", tag_dir, rel)
            return None
    return marker


def _info(tag_dir: Path, marker: dict) -> ResumeInfo:
    return ResumeInfo(
        tag=tag_dir.name,
        path=tag_dir,
        step=int(marker["step"]),
        samples_seen=int(marker["samples_seen"]),
        world_size=int(marker["world_size"]),
        zero_stage=int(marker["zero_stage"]),
        marker=marker,
    )


def inspect_run_dir(run_dir: str | Path) -> ResumeInfo | None:
    """The newest complete checkpoint of ``run_dir``; None when it has no checkpoints at all.

    Raises CheckpointError when checkpoints exist but none is complete: starting fresh there would
    silently throw away a run.
    """
    ckpt_dir = checkpoints_dir(run_dir)
    tags = _tag_dirs(ckpt_dir)
    if not tags:
        return None
    pointed = _read_latest(ckpt_dir)
    for tag_dir in reversed(tags):
        marker = verify(tag_dir)
        if marker is None:
            log.warning("skipping incomplete checkpoint %s (no valid %s marker)", tag_dir, MARKER)
            continue
        if pointed is not None and pointed != tag_dir.name:
            log.warning("'latest' names %s but %s is the newest complete checkpoint; using it", pointed, tag_dir.name)
        return _info(tag_dir, marker)
    raise CheckpointError(
        f"{ckpt_dir} holds {len(tags)} checkpoint(s) ({tags[0].name} .. {tags[-1].name}) but none is complete "
        f"(a job was killed while saving). Refusing to start fresh over them: move the folder away to start "
        f"a new run, or point train.run_dir at a new directory."
    )


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        text = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        log.warning("%s/%s is missing; looking for the newest complete checkpoint", ckpt_dir, LATEST)
        return None
    if not text:
        log.warning("%s/%s is empty; looking for the newest complete checkpoint", ckpt_dir, LATEST)
        return None
    return text


# Model keys that change the parameter shapes or the computed function; others (dropout, drop path,
# checkpointing) may differ between a run and its resume.
ARCH_KEYS = ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "pool", "channels",
             "dim_head", "qkv_bias", "layer_norm_eps", "patch_norm", "norm_before_pool", "class_token")  # fmt: skip


def check_fits(info: ResumeInfo, model: dict, zero_stage: int) -> None:
    """Refuse to resume ``info`` under another model architecture or ZeRO stage, key by key."""
    saved = info.marker.get("model", {})
    diff = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {model[k]!r}" for k in ARCH_KEYS if saved.get(k) != model[k]
    ]
    if diff:
        raise CheckpointError(
            f"{info.path} was written for another model: {'; '.join(diff)}. Use the original model config, "
            f"or a new train.run_dir (fine-tuning from it: finetune.init_from={info.path.parent.parent})"
        )
    if info.zero_stage != zero_stage:
        raise CheckpointError(
            f"{info.path} was written with ZeRO stage {info.zero_stage}; set train.zero_stage={info.zero_stage} "
            f"to resume it (changing the stage mid-run is not supported)"
        )


def resolve_checkpoint(path: str | Path) -> ResumeInfo:
    """A run dir, its checkpoints dir, or one tag dir -> the complete checkpoint it means."""
    path = Path(path)
    if (path / MARKER).exists() or path.name.startswith(TAG_PREFIX):
        marker = verify(path)
        if marker is None:
            raise CheckpointError(f"{path} is not a complete checkpoint (no valid {MARKER} marker)")
        return _info(path, marker)
    run_dir = path.parent if path.name == "checkpoints" else path
    info = inspect_run_dir(run_dir)
    if info is None:
        raise CheckpointError(f"{path} holds no checkpoints (expected <run_dir>/checkpoints/step_*/)")
    return info


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and stale partials."""
    tags = _tag_dirs(ckpt_dir)
    complete = [t for t in tags if (t / MARKER).exists()]
    keep = set(complete[-keep_last:])
    newest_complete = int(complete[-1].name[len(TAG_PREFIX) :]) if complete else -1
    for t in tags:
        step = int(t.name[len(TAG_PREFIX) :])
        # Partial checkpoints newer than the newest complete one may be another rank's save in
        # flight; only older partials are garbage.
        if t not in keep and (t in complete or step < newest_complete):
            shutil.rmtree(t, ignore_errors=True)
            shutil.rmtree(t.with_name(t.name + "_universal"), ignore_errors=True)


def read_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / STATE).read_text())


def write_state(tag_dir: Path, state: dict) -> None:
    atomic_write(tag_dir / STATE, json.dumps(state, indent=1, sort_keys=True))
