"""pipeline.durable: the one atomic-write rule (temp file, fsync, rename, directory fsync), and a guard
that no module of pipeline/ or launch/ replaces files its own way again."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from pipeline import durable
from pipeline.durable import atomic_write, atomic_write_via

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_the_file_with_exactly_the_data_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "old")
    atomic_write(target, '{"step": 7, "name": "ViT-B/16 · µ"}\n')
    assert target.read_bytes() == '{"step": 7, "name": "ViT-B/16 · µ"}\n'.encode()
    atomic_write(target, b"\x00\xffraw")
    assert target.read_bytes() == b"\x00\xffraw"
    atomic_write(str(target), "")
    assert target.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_file_is_synced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "latest"
    target.write_text("step_00000100")
    synced: list[tuple[Path, str]] = []  # (what was synced, what the target held at that moment)
    real = durable.fsync_path

    def spy(path: Path) -> None:
        synced.append((Path(path), target.read_text()))
        real(path)

    monkeypatch.setattr(durable, "fsync_path", spy)
    atomic_write(target, "step_00000200")
    assert len(synced) == 2, synced
    (tmp, before), (folder, after) = synced
    assert tmp.parent == tmp_path and tmp.name.startswith(".latest.") and tmp.name.endswith(".tmp")
    assert before == "step_00000100"  # the new data is on disk before the name points at it
    assert folder == tmp_path and after == "step_00000200"  # then the rename itself is made durable


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    atomic_write(target, b"old weights")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new wei")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_via(target, half_then_fail)
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C mid-write cleans up too

    with pytest.raises(KeyboardInterrupt):
        atomic_write_via(target, interrupted)
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_writer_that_fails_before_creating_anything_leaves_no_file(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError):
        atomic_write_via(tmp_path / "new.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_via_hands_the_callback_a_fresh_hidden_path_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        assert not tmp.exists()
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write_via(tmp_path / "a.bin", write)
    atomic_write_via(tmp_path / "a.bin", write)
    assert [p.parent for p in seen] == [tmp_path, tmp_path] and all(p.name.startswith(".a.bin.") for p in seen)
    assert seen[0] != seen[1]  # two writers of one file never share a temporary file
    assert (tmp_path / "a.bin").read_text() == "x"


def test_durable_stays_a_leaf_of_standard_library_imports() -> None:
    tree = ast.parse((ROOT / "pipeline" / "durable.py").read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= set(sys.stdlib_module_names), sorted(imported - set(sys.stdlib_module_names))


# --- the guard: every file replacement goes through pipeline.durable ---------------------------------

# Renames that are not "replace a file with new content", each with why it stays.
ALLOWED = {
    ("pipeline/data/writer.py", "os.rename"): "swaps whole data-set directories into place, then fsyncs the parent",
    ("pipeline/train/lease.py", "os.rename"): "moves a lease file aside to remove it: of two removers only one wins",
    ("pipeline/tracking/delivery.py", "self._buffer.replace"): "JsonlFile.replace, which writes via atomic_write",
    (
        "pipeline/tracking/models.py",
        "staged.rename",
    ): "swaps a whole MLflow model folder (files fsynced) in",
}


def _replacements(source: str) -> list[str]:
    """The callees in ``source`` that rename or replace a file: ``os.replace``/``os.rename``/``shutil.move``,
    and ``x.replace(y)``/``x.rename(y)`` with one argument (``Path``'s; ``str.replace`` takes two)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        callee = ast.unparse(node.func)
        if callee in ("os.replace", "os.rename", "shutil.move"):
            found.append(callee)
        elif node.func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords:
            found.append(callee)
    return found


def test_the_guard_sees_the_old_hand_written_copies() -> None:
    old = (
        "tmp = path.with_name('.x.tmp')\ntmp.write_text(text)\nos.replace(tmp, path)\n"
        "tmp.replace(out_dir / WEIGHTS)\nname = name.replace('/', '')\n"
    )
    assert _replacements(old) == ["os.replace", "tmp.replace"]


def test_every_file_replacement_in_pipeline_and_launch_goes_through_durable() -> None:
    found: dict[tuple[str, str], int] = {}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "launch").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "pipeline/durable.py":
            continue
        for callee in _replacements(path.read_text()):
            found[(rel, callee)] = found.get((rel, callee), 0) + 1
    unexpected = sorted(set(found) - set(ALLOWED))
    assert not unexpected, (
        f"files replaced by hand at {unexpected}: write them with pipeline.durable.atomic_write (or "
        f"atomic_write_via), whose rule is fsync file, rename, fsync directory; or add the site to ALLOWED "
        f"with the reason it is not a file replacement"
    )
    assert set(ALLOWED) <= set(found), f"stale ALLOWED entries: {sorted(set(ALLOWED) - set(found))}"
