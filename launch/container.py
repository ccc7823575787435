"""Run each rank inside an Apptainer image: the `python` command submitit uses, wrapped.

submitit starts every rank as ``<python> -u -m submitit.core._submit <folder>``; with a container
``<python>`` becomes ``apptainer exec [--nv] --bind ... IMAGE.sif python3``, so the rank, its
rendezvous and its requeue run exactly as without one. The image needs the project's dependencies
(torch, deepspeed, submitit, ...); the project's code comes from the bound source tree, so the job
runs the code that was submitted. Apptainer passes the host environment through (SLURM_*,
SUBMITIT_*, MASTER_* reach the rank); ``--nv`` exposes the node's GPUs.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

CONTAINER_PYTHON = "python3"


class ContainerError(ValueError):
    """The container settings cannot work; the message says how to fix them."""


def _bind_spec(path: Path, read_only: bool) -> str:
    text = str(path)
    if "," in text or ":" in text:
        raise ContainerError(f"cannot bind {text} into the container: Apptainer's --bind cannot express ',' or ':'")
    return f"{text}:{text}:ro" if read_only else text


def _covered(path: Path, others: Sequence[Path]) -> bool:
    return any(o != path and path.is_relative_to(o) for o in others)


def bind_paths(*, data: Path, run_dir: Path, submitit_dir: Path, source: Path) -> list[str]:
    """--bind entries: data and source read-only; the run dir (checkpoints, logs) and the submitit
    folder writable. A path already inside another bound writable path is not bound twice."""
    writable = [run_dir.absolute(), submitit_dir.absolute()]
    data = data.absolute() if not data.is_file() else data.absolute().parent  # an index file: its shards' tree
    read_only = [data, source.absolute()]
    binds = [_bind_spec(p, False) for p in writable if not _covered(p, writable)]
    binds += [_bind_spec(p, True) for p in dict.fromkeys(read_only) if not _covered(p, writable)]
    return binds


def apptainer_python(image: str | Path, *, binds: Sequence[str], gpus: bool, source: Path) -> str:
    """The shell command that replaces `python` for submitit (see the module doc)."""
    parts = ["apptainer", "exec"]
    if gpus:
        parts.append("--nv")
    parts += ["--bind", ",".join(binds), "--env", f"PYTHONPATH={source.absolute()}", str(Path(image).absolute())]
    parts.append(CONTAINER_PYTHON)
    return shlex.join(parts)


def check_image(image: str | Path) -> None:
    path = Path(image)
    if not path.is_file():
        raise ContainerError(
            f"launch.container: {image} does not exist; build it first (e.g. `apptainer build image.sif "
            f"docker-daemon://IMAGE:TAG`) and pass its path with --container"
        )
    if path.suffix != ".sif":
        raise ContainerError(f"launch.container: {image} is not an Apptainer image (.sif); pass a .sif file")
