"""Disk space for checkpoints: warn before a save that would not fit, and name the save that did not.

The rule: ``checkpoint.keep_last`` complete checkpoints plus the one being written (the oldest is
pruned only after the new one commits) must fit on the run dir's filesystem. One checkpoint's size
is taken from the newest one on disk, or estimated from the model before the first save. No torch
here: sizes in, messages out.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from pipeline.artifacts.checkpoints import MARKER, CheckpointError

# ZeRO checkpoint bytes per parameter besides the weights: the fp32 master copy and AdamW's two
# moments (12 bytes, "ZeRO", Rajbhandari et al. 2020, section 3.1), written once over all ranks.
OPTIMIZER_BYTES_PER_PARAM = 12


class CheckpointSpaceError(CheckpointError):
    """A checkpoint save ran out of disk space."""


def estimate_bytes(num_params: int, weight_bytes: int) -> int:
    """One checkpoint of a model with ``num_params`` parameters stored at ``weight_bytes`` each."""
    return num_params * (weight_bytes + OPTIMIZER_BYTES_PER_PARAM)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a checkpoint's tag dir)."""
    return sum((Path(root) / name).stat().st_size for root, _, files in os.walk(path) for name in files)


def held_bytes(ckpt_dir: Path) -> int:
    """Bytes held by the complete checkpoints: space that pruning hands back to later saves."""
    if not ckpt_dir.is_dir():
        return 0
    return sum(tree_bytes(t) for t in ckpt_dir.iterdir() if (t / MARKER).is_file())


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def _free(ckpt_dir: Path) -> int:
    existing = next(p for p in (ckpt_dir, *ckpt_dir.parents) if p.exists())
    return shutil.disk_usage(existing).free


def space_warning(ckpt_dir: Path, *, one_bytes: int, keep_last: int, step: int) -> str | None:
    """A warning when keep_last + 1 checkpoints of ``one_bytes`` would not fit; None when they do."""
    free, held = _free(ckpt_dir), held_bytes(ckpt_dir)
    need = (keep_last + 1) * one_bytes
    if free + held >= need:
        return None
    soon = "the next checkpoint will not fit" if free < one_bytes else "a later checkpoint will not fit"
    return (
        f"{soon}: at step {step}, {ckpt_dir} has {_gb(free)} free and {_gb(held)} in complete checkpoints, but "
        f"checkpoint.keep_last={keep_last} plus the one being written need {keep_last + 1} x ~{_gb(one_bytes)} = "
        f"{_gb(need)}; free space there, lower checkpoint.keep_last, or point train.run_dir at a larger filesystem"
    )


def is_out_of_space(exc: BaseException, ckpt_dir: Path, one_bytes: int) -> bool:
    """``exc`` came from a full disk: ENOSPC, or a torch/DeepSpeed write error with the disk near full.

    torch.save reports a full disk as a RuntimeError ("file write failed") without the errno, so the
    free space is the evidence there.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, (OSError, RuntimeError)) and _free(ckpt_dir) < one_bytes


def out_of_space_error(tag_dir: Path, step: int, keep_last: int, exc: BaseException) -> CheckpointSpaceError:
    return CheckpointSpaceError(
        f"no space left on device while saving the step-{step} checkpoint to {tag_dir} ({_gb(_free(tag_dir.parent))} "
        f"free there; {type(exc).__name__}: {exc}). The newest complete checkpoint is untouched and a restart "
        f"resumes from it; free space there, lower checkpoint.keep_last (now {keep_last}), or point train.run_dir "
        f"at a larger filesystem"
    )
