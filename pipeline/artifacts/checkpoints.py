"""Reading what a run's checkpoints hold on disk: layout, commit markers, verification, trainer state.

A leaf: the launcher's checks, the training engine (resume), fine-tuning (init from a pretrain
run) and the benchmarks all read checkpoints through here; only the engine writes them
(``pipeline.train.checkpoint`` commits, ``pipeline.train.saving`` saves).

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed's shards (every rank writes its own)
        trainer_state.json    step, samples seen, data position, run id, config (rank 0)
        rng_rank{r}.pt        each rank's RNG states
        loader_rank{r}.json   each rank's data position and skipped-sample counts
        COMMITTED             written last, atomically, after a barrier: the checkpoint counts
    latest                    "step_00000100", replaced atomically after the commit

The marker lists every file with its size and a CRC-32 computed by the rank that wrote it, right
after writing it (the bytes are still in the page cache). Same-size damage (a flipped block, a
garbage file of the right length) passes a size check and would be trained on; a checksum
mismatch makes the checkpoint count as incomplete, exactly like a missing file. CRC-32 (zlib)
because it detects accidental damage (not tampering; any burst of up to 32 bits, other damage
with probability 1 - 2^-32) at ~2.4 GB per CPU-second here, 1.8x sha256 with SHA-NI and 4x
blake2b (see bench/RESULTS.md). Markers written before checksums existed are
verified by sizes only, with a note.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
LATEST = "latest"
STATE = "trainer_state.json"
TAG_PREFIX = "step_"
CHECKSUM = "crc32"
# Files up to this size are hashed wherever a checkpoint is inspected (the launcher's preflight on a
# login node included: trainer_state.json, RNG states); bigger shards are hashed by the job's ranks.
SMALL_FILE_BYTES = 16 * 2**20
_CHUNK = 8 * 2**20


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
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over, each "tag: what is wrong"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def loader_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"loader_rank{rank}.json"


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[5:].isdigit()]
    return sorted(tags, key=lambda p: int(p.name[len(TAG_PREFIX) :]))


def listed_files(tag_dir: Path) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(tag_dir):
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(tag_dir).as_posix()
            if rel != MARKER and not name.startswith("."):
                out[rel] = p.stat().st_size
    return out


def file_checksum(path: Path) -> str:
    """CRC-32 of the file's bytes, as 8 hex digits (read in 8 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_files(tag_dir: Path, paths: Iterable[Path]) -> dict[str, str]:
    """{path relative to ``tag_dir``: checksum} of the files this rank just wrote."""
    return {Path(p).relative_to(tag_dir).as_posix(): file_checksum(Path(p)) for p in paths}


def read_marker(tag_dir: Path) -> tuple[dict | None, str | None]:
    """(marker, None) or (None, what is wrong with it)."""
    path = tag_dir / MARKER
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no {MARKER} marker (the save did not finish)"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e})"
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None, f"{path} is not a commit marker (no file list)"
    return marker, None


def size_problems(tag_dir: Path, marker: dict) -> list[str]:
    """Every listed file that is missing or has another size than at the commit."""
    problems = []
    for rel, size in marker["files"].items():
        p = tag_dir / rel
        have = p.stat().st_size if p.is_file() else None
        if have != size:
            found = "missing" if have is None else f"{have} bytes"
            problems.append(f"{p} is missing or has the wrong size ({found}, committed {size} bytes)")
    return problems


def checksum_share(marker: dict, rank: int, world_size: int, max_bytes: int | None = None) -> list[str]:
    """The files ``rank`` verifies: those it wrote when the world size is unchanged, the rest dealt
    out round-robin, so the ranks together read every file once, in parallel."""
    sums = marker.get("checksums", {}).get("files", {})
    writers = marker.get("checksums", {}).get("writers", {})
    same = int(marker.get("world_size", -1)) == world_size
    mine, orphans = [], []
    for rel in sorted(sums):
        if max_bytes is not None and marker["files"].get(rel, 0) > max_bytes:
            continue
        writer = writers.get(rel)
        if same and writer is not None and writer < world_size:
            if writer == rank:
                mine.append(rel)
        else:
            orphans.append(rel)
    return mine + orphans[rank::world_size]


def checksum_problems(tag_dir: Path, marker: dict, names: list[str]) -> list[str]:
    """The files among ``names`` whose bytes no longer match the checksum of the commit."""
    sums = marker["checksums"]["files"]
    problems = []
    for rel in names:
        try:
            digest = file_checksum(tag_dir / rel)
        except OSError as e:
            problems.append(f"{tag_dir / rel} is unreadable ({e.strerror or e})")
            continue
        if digest != sums[rel]:
            problems.append(f"{tag_dir / rel} does not match its checksum ({CHECKSUM} {digest}, committed {sums[rel]})")
    return problems


def verify(tag_dir: Path) -> dict | None:
    """The marker if ``tag_dir`` is complete (marker present, every listed file at its size)."""
    marker, problem = read_marker(tag_dir)
    problems = [problem] if marker is None else size_problems(tag_dir, marker)
    if problems:
        log.warning("checkpoint %s is damaged: %s", tag_dir, "; ".join(problems))
        return None
    return marker


Agree = Callable[[list[str]], list[str]]


def _alone(problems: list[str]) -> list[str]:
    return problems


def check_tag(
    tag_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    agree: Agree = _alone,
    max_bytes: int | None = SMALL_FILE_BYTES,
) -> tuple[dict | None, list[str]]:
    """(marker, []) if ``tag_dir`` is complete and intact, else (None, what is wrong).

    Every rank checks sizes and the checksums of its share (files over ``max_bytes`` are left to
    sizes; None hashes all), then ``agree`` (a collective in a job) unites the ranks' findings so
    that all ranks take the same decision.
    """  # fmt: skip
    marker, problem = read_marker(tag_dir)
    mine = [problem] if marker is None else size_problems(tag_dir, marker)
    if marker is not None and not mine:
        if "checksums" in marker:
            mine = checksum_problems(tag_dir, marker, checksum_share(marker, rank, world_size, max_bytes))
        mine += _state_problems(tag_dir, marker)
    problems = list(dict.fromkeys(agree(mine)))  # in rank order, without repeats
    if marker is not None and not problems and "checksums" not in marker and rank == 0:
        log.warning(
            "checkpoint %s has no checksums (written before they were recorded): verified by file sizes only",
            tag_dir,
        )  # fmt: skip
    return (None, problems) if problems else (marker, [])


def _state_problems(tag_dir: Path, marker: dict) -> list[str]:
    """trainer_state.json must parse (catches garbage in old, checksum-less checkpoints too)."""
    if STATE not in marker["files"]:
        return []
    try:
        read_state(tag_dir)
    except CheckpointError as e:
        return [str(e)]
    return []


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


def inspect_run_dir(
    run_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    agree: Agree = _alone,
    max_bytes: int | None = SMALL_FILE_BYTES,
) -> ResumeInfo | None:
    """The newest complete, intact checkpoint of ``run_dir``; None when it has no checkpoints at all.

    A damaged checkpoint (missing file, wrong size, checksum mismatch, unreadable state) is skipped
    with a warning naming the file and the step, like an incomplete one. Raises CheckpointError
    when checkpoints exist but none is usable: starting fresh there would silently throw away a run.
    In a job every rank calls this with its rank and a collective ``agree`` (see check_tag).
    """  # fmt: skip
    ckpt_dir = checkpoints_dir(run_dir)
    tags = tag_dirs(ckpt_dir)
    if not tags:
        return None
    pointed = _read_latest(ckpt_dir)
    skipped = []
    for tag_dir in reversed(tags):
        marker, problems = check_tag(tag_dir, rank=rank, world_size=world_size, agree=agree, max_bytes=max_bytes)
        if marker is None:
            step = int(tag_dir.name[len(TAG_PREFIX) :])
            why = "; ".join(problems)
            log.warning("skipping incomplete checkpoint %s (step %d): %s; falling back to the previous one",
                        tag_dir.name, step, why)  # fmt: skip
            skipped.append(f"{tag_dir.name}: {why}")
            continue
        if pointed is not None and pointed != tag_dir.name:
            log.warning("'latest' names %s but %s is the newest complete checkpoint; using it", pointed, tag_dir.name)
        return replace(_info(tag_dir, marker), skipped=tuple(skipped))
    raise CheckpointError(
        f"{ckpt_dir} holds {len(tags)} checkpoint(s) ({tags[0].name} .. {tags[-1].name}) but none is complete "
        f"and intact ({' | '.join(skipped)}). Refusing to start fresh over them: restore the files from a copy, "
        f"move the folder away to start a new run, or point train.run_dir at a new directory."
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
        marker, problems = check_tag(path, max_bytes=None)
        if marker is None:
            raise CheckpointError(f"{path} is not a complete checkpoint: {'; '.join(problems)}")
        return _info(path, marker)
    run_dir = path.parent if path.name == "checkpoints" else path
    info = inspect_run_dir(run_dir)
    if info is None:
        raise CheckpointError(f"{path} holds no checkpoints (expected <run_dir>/checkpoints/step_*/)")
    return info


def read_state(tag_dir: Path) -> dict:
    """trainer_state.json; an unreadable one raises CheckpointError naming the file."""
    path = tag_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a trainer state (no 'step')")
    return state


def read_torch(path: Path) -> Any:
    """A small torch file of a checkpoint (RNG states); errors name the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types (pickle, zip, EOF) without the path
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
