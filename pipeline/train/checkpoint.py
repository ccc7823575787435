"""Committing checkpoints: flush, checksum, the COMMITTED marker, ``latest``, pruning.

DeepSpeed itself writes ``latest`` before the other ranks' shards exist and, when it is
missing, silently starts fresh (see the notes on DeepSpeed's code); we never let it write
``latest``, always pass the tag ourselves, and verify the marker's file list before loading.
The layout and every reader are in :mod:`pipeline.artifacts.checkpoints`; the collective save
that calls these is :mod:`pipeline.train.saving`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.artifacts import checkpoints as stored
from pipeline.durable import atomic_write, fsync_path


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


def fsync_and_checksum(tag_dir: Path, written: list[Path]) -> dict[str, str]:
    """Flush the tag dir (see fsync_tree) while a thread checksums the files this rank wrote.

    fsync waits on the disk, CRC-32 on the CPU (zlib and file reads release the GIL), so the
    checksum hides under the flush instead of adding to the save (bench/train.py measures it).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        sums = pool.submit(stored.checksum_files, tag_dir, written)
        fsync_tree(tag_dir)
        return sums.result()


def commit(tag_dir: Path, info: dict[str, Any], checksums: list[dict[str, str]] | None = None) -> int:
    """Write the commit marker (rank 0, after every rank's files are flushed) and move ``latest``.

    ``checksums[r]`` holds the checksums rank r computed of the files it wrote; files no rank
    claimed (DeepSpeed's copied recovery script) are hashed here. Returns the bytes the marker
    lists (the checkpoint's size).
    """
    files = stored.listed_files(tag_dir)
    sums: dict[str, str] = {}
    writers: dict[str, int] = {}
    for rank, part in enumerate(checksums or []):
        for rel, digest in part.items():
            sums[rel], writers[rel] = digest, rank
    sums.update({rel: stored.file_checksum(tag_dir / rel) for rel in files if rel not in sums})
    marker = dict(
        info,
        tag=tag_dir.name,
        files=files,
        checksums={"algorithm": stored.CHECKSUM, "files": sums, "writers": writers},
        committed_at=time.time(),
    )
    atomic_write(tag_dir / stored.MARKER, json.dumps(marker, indent=1, sort_keys=True))
    atomic_write(tag_dir.parent / stored.LATEST, tag_dir.name)
    return sum(marker["files"].values())


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and stale partials."""
    tags = stored.tag_dirs(ckpt_dir)
    complete = [t for t in tags if (t / stored.MARKER).exists()]
    keep = set(complete[-keep_last:])
    newest_complete = int(complete[-1].name[len(stored.TAG_PREFIX) :]) if complete else -1
    for t in tags:
        step = int(t.name[len(stored.TAG_PREFIX) :])
        # Partial checkpoints newer than the newest complete one may be another rank's save in
        # flight; only older partials are garbage.
        if t not in keep and (t in complete or step < newest_complete):
            shutil.rmtree(t, ignore_errors=True)
            shutil.rmtree(t.with_name(t.name + "_universal"), ignore_errors=True)


def write_state(tag_dir: Path, state: dict) -> None:
    atomic_write(tag_dir / stored.STATE, json.dumps(state, indent=1, sort_keys=True))
