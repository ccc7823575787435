"""Shard writer, indexer and preflight CLI.

    python -m pipeline.data write --out DIR --synthetic 1000 --classes 10 --size 32
    python -m pipeline.data write --out DIR --digits --size 32
    python -m pipeline.data write --out DIR path/to/train [--val-source path/to/val] [--strict]
        (an ImageFolder tree, or a list file of path<TAB>label or path,label lines)
    python -m pipeline.data index SOURCE... --out INDEX [--val SOURCE...] [--label json:FIELD]
    python -m pipeline.data check DIR|INDEX --ranks 16 --workers 8 --batch-size 256 [--decode]

``check`` exits 0 when every rank and worker gets data, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.data.errors import PreflightError
from pipeline.data.index import LabelSpec
from pipeline.data.preflight import preflight


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split("\n\n")[0])
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
    _index_parser(sub)
    c = sub.add_parser("check", help="preflight: can this data feed R ranks x W workers?")
    c.add_argument("dir", help="a shard directory holding _info.json, or an index file")
    c.add_argument("--split", default="train")
    c.add_argument("--ranks", type=int, default=1, help="nodes x GPUs per node")
    c.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    c.add_argument("--batch-size", type=int, default=1, help="micro batch per rank")
    c.add_argument("--decode", action="store_true", help="read and decode every sample")
    c.add_argument("--checksum", action="store_true", help="verify each shard's sha256")
    c.add_argument("--max-skip-frac", type=float, default=0.0, help="with --decode: tolerated unreadable fraction")
    c.add_argument("--no-progress", action="store_true")
    return p


def _index_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="index existing shards in place (reads tar headers only)")
    i.add_argument("sources", nargs="+", metavar="SOURCE", help="shard directories, files, globs or brace patterns")
    i.add_argument("--out", required=True, help="the index file to write (anywhere), or a directory for _info.json")
    i.add_argument("--val", nargs="+", default=[], metavar="SOURCE", help="separate validation shards")
    i.add_argument("--val-frac", type=float, default=None, help="without --val: hold out this fraction of whole shards")
    i.add_argument("--seed", type=int, default=0, help="seed of the --val-frac hold-out")
    i.add_argument("--label", default="cls", help="cls (default: an integer as text) or json:FIELD")
    i.add_argument("--unlabeled", action="store_true", help="no labels (self-supervised use and inspection)")
    i.add_argument("--classes", metavar="FILE", help="class names, one per line (line i names class i)")
    i.add_argument("--jobs", type=int, default=0, help="processes reading headers (default: one per CPU)")
    i.add_argument("--sha256", action="store_true", help="also record each shard's sha256 (reads every byte)")
    i.add_argument("--skip-damaged", action="store_true", help="leave damaged shards out (listed) instead of failing")
    i.add_argument("--no-progress", action="store_true")


def _label_spec(a: argparse.Namespace) -> LabelSpec:
    if a.unlabeled:
        if a.label != "cls":
            raise PreflightError(f"--unlabeled and --label {a.label} contradict each other; give one")
        return LabelSpec("none")
    if a.label == "cls":
        return LabelSpec("cls")
    kind, _, name = a.label.partition(":")
    if kind != "json" or not name:
        raise PreflightError(f"--label {a.label!r}: use cls, json:FIELD (e.g. json:label), or --unlabeled")
    return LabelSpec("json", name)


def _index(a: argparse.Namespace) -> None:
    from pipeline.data.indexer import build_index

    val_frac = a.val_frac if a.val_frac is not None else (0.0 if a.val else 0.05)
    report = build_index(
        a.sources,
        out=a.out,
        val=a.val,
        val_frac=val_frac,
        seed=a.seed,
        label=_label_spec(a),
        classes_file=a.classes,
        jobs=a.jobs,
        sha256=a.sha256,
        skip_damaged=a.skip_damaged,
        progress=not a.no_progress,
    )
    print(report.summary())
    if not a.val and val_frac > 0:
        val = report.index.splits.get("val")
        print(
            f"val: {len(val.shards) if val else 0} whole shards held out of the train sources (seed {a.seed}, "
            f"--val-frac {val_frac}); name a separate val set with --val SOURCE..., or --val-frac 0 for none"
        )
    print(f"set data.path={report.path}")


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
        {"write": _write, "index": _index, "check": _check}[a.command](a)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
