"""ImageFolder trees and list files: find the source images, read and check each one, report the bad ones.

Torch-free on purpose (PIL and numpy only): the shard writer's render processes import this module,
not the writer, so they start in about a second instead of paying for torch (tens of seconds on a
busy node). Every image is decoded to the end (PIL's ``verify()`` passes a truncated JPEG); a file
that cannot become a sample raises :class:`BadImage`, which :class:`WriteReport` counts by kind with
examples (or turns into an error with ``strict``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.errors import PreflightError
from pipeline.data.pixels import to_rgb

ImageFormat = Literal["jpg", "png", "webp"]
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_FORMAT_EXT = {v: k for k, v in _PIL_FORMAT.items()}  # what the bytes really are -> member extension
REPORT_NAME = "_write_report.json"
_EXAMPLES = 10  # examples kept per kind of skipped file

# Why a file was skipped, as the report and the log explain it.
SKIP_KINDS = {
    "stray_file": "a file beside the class folders, not inside one",
    "hidden_folder": "a folder whose name starts with '.' (not a class)",
    "unsupported_extension": "not .jpg/.jpeg/.png/.webp (e.g. .txt, .DS_Store)",
    "missing_file": "a list-file line naming a file that does not exist",
    "unreadable_file": "the file could not be read",
    "not_an_image": "PIL cannot identify it as an image (e.g. a text file named .jpg)",
    "corrupt_image": "it does not decode to the end (truncated or damaged)",
    "decompression_bomb": "more pixels than PIL's Image.MAX_IMAGE_PIXELS (a decompression bomb)",
    "unsupported_format": "neither JPEG, PNG nor WebP inside (copied bytes must be one of these; --resize re-encodes)",
    "unsupported_mode": "a pixel mode with no conversion to RGB",
}


class BadImage(Exception):
    """A source file that cannot become a sample: skipped and reported (or fatal with ``strict``)."""

    def __init__(self, kind: str, where: str, detail: str) -> None:
        assert kind in SKIP_KINDS, kind
        super().__init__(f"{where}: {detail}")
        self.kind, self.where, self.detail = kind, where, detail

    def __reduce__(self) -> tuple[Any, ...]:  # pickled from a render worker; Exception's default loses the fields
        return BadImage, (self.kind, self.where, self.detail)


@dataclass
class WriteReport:
    """What an ImageFolder / list-file write skipped, by kind, with examples; saved as ``_write_report.json``."""

    source: str
    val_source: str | None = None
    strict: bool = False
    written: dict[str, int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, bad: BadImage) -> None:
        if self.strict:
            raise PreflightError(
                f"{bad.where}: {bad.detail} ({bad.kind}: {SKIP_KINDS[bad.kind]}); --strict stops at the first bad "
                f"file and writes nothing: remove or fix it, or drop --strict to skip and report such files"
            )
        self.skipped[bad.kind] += 1
        shown = self.examples.setdefault(bad.kind, [])
        if len(shown) < _EXAMPLES:
            shown.append(f"{bad.where}: {bad.detail}")

    def summary(self) -> str:
        written = ", ".join(f"{k} {v}" for k, v in self.written.items()) or "no"
        if not self.skipped:
            return f"wrote {written} images from {self.source}; no file skipped"
        kinds = "; ".join(f"{k} {n} (e.g. {self.examples[k][0]})" for k, n in self.skipped.most_common())
        return f"wrote {written} images from {self.source}; SKIPPED {sum(self.skipped.values())} files: {kinds}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "val_source": self.val_source,
            "written": self.written,
            "skipped_total": sum(self.skipped.values()),
            "skipped": {
                k: {"count": n, "why": SKIP_KINDS[k], "examples": self.examples[k]}
                for k, n in self.skipped.most_common()
            },
        }

    def save(self, root: Path) -> Path:
        path = root / REPORT_NAME
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return path


def read_report(root: str | Path) -> dict[str, Any] | None:
    """The ``_write_report.json`` of a data set written from images, or None (synthetic, digits, foreign)."""
    path = Path(root) / REPORT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def encode(array: np.ndarray, fmt: ImageFormat, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, _PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


Rendered = tuple[bytes, str] | BadImage


def render_all(renders: Sequence[Callable[[], tuple[bytes, str]]]) -> list[Rendered]:
    """Call each render; a :class:`BadImage` is returned in its place (a worker process sends both back)."""
    out: list[Rendered] = []
    for render in renders:
        try:
            out.append(render())
        except BadImage as bad:
            out.append(bad)
    return out


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the writer's to handle (it stops the pool)


def read_source(src: Path, report: WriteReport) -> tuple[list[tuple[Path, int]], list[str]]:
    if src.is_dir():
        return _scan_tree(src, report)
    if src.is_file():
        return _read_list(src, report)
    raise PreflightError(f"image source {src} does not exist; pass an ImageFolder root or a path<TAB>label list file")


def read_val_source(src: Path, train_classes: list[str], report: WriteReport) -> list[tuple[Path, int]]:
    """The val source's images, labelled by class name with the train source's class indices."""
    entries, classes = read_source(src, report)
    label_of = {name: i for i, name in enumerate(train_classes)}
    unknown = [c for c in classes if c not in label_of]
    if unknown:
        raise PreflightError(
            f"{src}: val class {unknown[0]!r} is not a train class ({len(unknown)} such: {', '.join(unknown[:5])}); "
            f"the train source has {len(train_classes)} classes ({', '.join(train_classes[:5])}...): the val "
            f"source must use the train source's class names"
        )
    return [(p, label_of[classes[y]]) for p, y in entries]


def _scan_tree(root: Path, report: WriteReport) -> tuple[list[tuple[Path, int]], list[str]]:
    top = sorted(root.iterdir())
    stray = [p.name for p in top if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise PreflightError(
            f"{root}: images directly in the root ({', '.join(stray[:3])}); an ImageFolder tree keeps each "
            f"class in its own folder: {root}/<class>/<image> (ImageNet's val folder comes flat: sort it into "
            f"class folders, or list it in a path<TAB>label file and pass that)"
        )
    for p in top:
        if p.is_file():
            report.skip(BadImage("stray_file", str(p), "not inside a class folder"))
        elif p.is_dir() and p.name.startswith("."):
            report.skip(BadImage("hidden_folder", str(p), "not read as a class"))
    classes = [p.name for p in top if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise PreflightError(f"{root}: no class folders; expected {root}/<class>/<image>.jpg")
    entries = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file())
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                report.skip(BadImage("unsupported_extension", str(p), f"extension {p.suffix or '(none)'!r}"))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            others = f" (it holds {len(files)} other files, e.g. {files[0].name})" if files else ""
            raise PreflightError(
                f"{root / name}: class folder with no .jpg/.jpeg/.png/.webp image{others}; add images or remove it"
            )
        entries += [(p, label) for p in images]
    return entries, classes


def _split_line(line: str) -> tuple[str, str, bool]:
    """``path<TAB>label`` when the line has a TAB (labels may then hold commas), else ``path,label`` at
    the last comma (paths may hold commas): (path, label, found)."""
    path, sep, label = line.rpartition("\t" if "\t" in line else ",")
    return path.strip(), label.strip(), bool(sep)


def _read_list(file: Path, report: WriteReport) -> tuple[list[tuple[Path, int]], list[str]]:
    """``path<TAB>label`` or ``path,label`` lines (``#`` comments and blank lines skipped); relative
    paths from the list's folder; labels all integers (class indices) or all class names."""
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, label, found = _split_line(line)
        if not found or not path or not label:
            raise PreflightError(f"{file}:{n}: expected 'path<TAB>label' or 'path,label', got {line!r}")
        p = Path(path)
        p = p if p.is_absolute() else file.parent / p
        if not p.is_file():
            hint = "" if "\t" in line else " (split at the last comma; put a TAB between path and label)"
            report.skip(BadImage("missing_file", f"{file}:{n}", f"{p} is not an existing file{hint}"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            report.skip(BadImage("unsupported_extension", f"{file}:{n}", f"{p} is not a .jpg/.jpeg/.png/.webp file"))
        else:
            rows.append((n, p, label))
    if not rows:
        raise PreflightError(f"{file}: no 'path<TAB>label' line names an existing image. {report.summary()}")
    numeric = [r for r in rows if r[2].isdigit()]
    if numeric and len(numeric) != len(rows):
        n, _, label = next(r for r in rows if not r[2].isdigit())
        raise PreflightError(
            f"{file}:{n}: wrong label type {label!r}: the other labels are class indices (non-negative integers); "
            f"use all integers or all class names"
        )
    if numeric:
        classes = [str(i) for i in range(max(int(r[2]) for r in rows) + 1)]
        return [(p, int(label)) for _, p, label in rows], classes
    classes = sorted({r[2] for r in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    return [(p, label_of[label]) for _, p, label in rows], classes


def _decode_fully(data: bytes, where: str) -> Image.Image:
    """Open and decode every pixel; a decompression bomb (PIL's warning too, not only its error) is bad."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # verify() alone passes a truncated JPEG
            return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", where, str(e)) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", where, "PIL cannot identify an image in it") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, ... on bad bytes
        raise BadImage("corrupt_image", where, f"{type(e).__name__}: {e}") from None


def load_image(path: Path, *, resize: int, fmt: ImageFormat, quality: int) -> tuple[bytes, str]:
    """(bytes, member extension) for one source file; raises :class:`BadImage` for a file to skip."""
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage("unreadable_file", where, f"{type(e).__name__}: {e.strerror or e}") from None
    img = _decode_fully(data, where)
    try:
        rgb = to_rgb(img)  # also when the bytes are copied: a mode we cannot convert would fail in training
    except ValueError as e:
        raise BadImage("unsupported_mode", where, f"mode {img.mode}: {e}") from None
    if not resize:
        ext = _FORMAT_EXT.get(img.format or "")
        if ext is None:
            raise BadImage("unsupported_format", where, f"{img.format} data under a {path.suffix} name")
        return data, ext  # the extension of what the bytes are, whatever the file is called
    scale = resize / min(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    return encode(np.asarray(rgb), fmt, quality), fmt
