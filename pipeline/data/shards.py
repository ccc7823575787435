"""Shard writer and preflight CLI.

    python -m pipeline.data.shards write --out DIR --synthetic 1000 --classes 10 --size 32
    python -m pipeline.data.shards write --out DIR --digits --size 32
    python -m pipeline.data.shards write --out DIR path/to/train [--val-source path/to/val] [--strict]
        (an ImageFolder tree, or a list file of path<TAB>label or path,label lines)
    python -m pipeline.data.shards check DIR --ranks 16 --workers 8 --batch-size 256 [--decode]

``check`` exits 0 when every rank and worker gets data, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.data.errors import PreflightError
from pipeline.data.preflight import preflight


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write tar shards and their index")
    w.add_argument(
        "source", nargs="?", help="an ImageFolder root (root/<class>/<img>) or a path<TAB>label / path,label list file"
    )
    w.add_argument(
        "--val-source",
        metavar="DIR",
        help="imagefolder: the val split from this tree or list file (train's class names); no hold-out from train",
    )
    w.add_argument(
        "--strict", action="store_true", help="imagefolder: stop at the first bad file (default: skip and report it)"
    )
    w.add_argument(
        "--workers",
        type=int,
        default=min(8, len(os.sched_getaffinity(0))),
        help="imagefolder: processes that decode the images (default: the CPUs this job may use, at most 8)",
    )
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--synthetic", type=int, metavar="N", help="N procedurally drawn, learnable images")
    w.add_argument("--digits", action="store_true", help="scikit-learn's bundled digits (1,797 images, 10 classes)")
    w.add_argument("--classes", type=int, default=10, help="synthetic: number of classes")
    w.add_argument("--size", type=int, default=32, help="synthetic/digits: image side in pixels")
    w.add_argument("--resize", type=int, default=0, help="imagefolder: re-encode with shorter side S (0: copy bytes)")
    w.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"), help="image encoding")
    w.add_argument("--quality", type=int, default=90)
    w.add_argument("--val-frac", type=float, default=None, help="fraction held out as val (default 0.1; digits 0.2)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--shard-max-count", type=int, default=1000, help="samples per shard at most")
    w.add_argument("--shard-max-bytes", type=int, default=1 << 30, help="bytes per shard (about)")
    w.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    w.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("check", help="preflight: can this data feed R ranks x W workers?")
    c.add_argument("dir")
    c.add_argument("--split", default="train")
    c.add_argument("--ranks", type=int, default=1, help="nodes x GPUs per node")
    c.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    c.add_argument("--batch-size", type=int, default=1, help="micro batch per rank")
    c.add_argument("--decode", action="store_true", help="read and decode every sample")
    c.add_argument("--checksum", action="store_true", help="verify each shard's sha256")
    c.add_argument("--max-skip-frac", type=float, default=0.0, help="with --decode: tolerated unreadable fraction")
    c.add_argument("--no-progress", action="store_true")
    return p


def _write(a: argparse.Namespace) -> None:
    sources = [s for s in (a.synthetic is not None, a.digits, a.source is not None) if s]
    if len(sources) != 1:
        raise PreflightError("give exactly one source: --synthetic N, --digits, or an ImageFolder root / list file")
    if a.source is None and (a.val_source is not None or a.strict):
        raise PreflightError("--val-source and --strict apply to an ImageFolder root / list file source only")
    from pipeline.data.writer import (  # imports torch (webdataset)
        REPORT_NAME,
        write_digits,
        write_imagefolder,
        write_synthetic,
    )

    common = dict(
        seed=a.seed,
        shard_max_count=a.shard_max_count,
        shard_max_bytes=a.shard_max_bytes,
        image_format=a.format,
        quality=a.quality,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )
    if a.synthetic is not None:
        index = write_synthetic(a.out, n=a.synthetic, classes=a.classes, size=a.size, val_frac=_vf(a, 0.1), **common)
    elif a.digits:
        index = write_digits(a.out, size=a.size, val_frac=_vf(a, 0.2), **common)
    else:
        index = write_imagefolder(
            a.out,
            source=a.source,
            val_source=a.val_source,
            strict=a.strict,
            workers=a.workers,
            resize=a.resize,
            val_frac=a.val_frac,
            **common,
        )
    for name, info in index.splits.items():
        print(f"{index.root}: {name} {info.samples} samples in {len(info.shards)} shards, {index.num_classes} classes")
    if a.source is not None:
        print(f"{index.root}: report of written and skipped files in {index.root / REPORT_NAME}")


def _vf(a: argparse.Namespace, default: float) -> float:
    return default if a.val_frac is None else a.val_frac


def _check(a: argparse.Namespace) -> None:
    report = preflight(
        a.dir,
        split=a.split,
        ranks=a.ranks,
        workers=a.workers,
        decode=a.decode,
        batch_size=a.batch_size,
        checksum=a.checksum,
        max_skip_frac=a.max_skip_frac,
        progress=not a.no_progress,
    )
    print(report.summary())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = _parser().parse_args(argv)
    try:
        _write(a) if a.command == "write" else _check(a)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
