"""Imports run one way (STYLE 11): leaves, then data and tracking, then the engine, then stages.

Reads every module under pipeline/ (imports inside functions and under TYPE_CHECKING too: a lazy
import is still a dependency) and fails on an import against that order or a cycle between
packages, naming file:line. Also: each external library behind its one seam (STYLE 1).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"

# Lower number = lower layer; a module may import its own layer or below, never above.
LAYER = {
    "pipeline": 0,  # the package's own __init__ (and anything it re-exports) is a leaf
    "pipeline.model": 0,
    "pipeline.config": 0,
    "pipeline.durable": 0,
    "pipeline.proc": 0,
    "pipeline.logs": 0,
    "pipeline.metric_names": 0,  # the table of metric names: the loader and the engine both log them
    "pipeline.artifacts": 0,  # checkpoint and export readers: the engine, the stages and the launcher read them
    "pipeline.data": 1,
    "pipeline.tracking": 1,
    "pipeline.train": 2,
    "pipeline.finetune": 3,  # stages: plug into the engine through pipeline.train.stage
    "pipeline.mae": 3,
    "pipeline.stages": 3,
    "ENTRY": 4,  # `python -m` entry points (__main__.py): they pick the stage, nothing imports them
    "launch": 4,
}


def package_of(module: str) -> str:
    """``pipeline.train.lifecycle`` -> ``pipeline.train``; ``pipeline.train.__main__`` -> ENTRY."""
    if module.endswith(".__main__"):
        return "ENTRY"
    parts = module.split(".")
    if parts[0] == "launch":
        return "launch"
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement of the file, wherever it sits."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from pipeline.train import engine` imports the submodule pipeline.train.engine
                yield (f"{base}.{alias.name}" if base in ("pipeline", "launch") else base), node.lineno


def pipeline_files() -> list[Path]:
    return sorted(PIPELINE.rglob("*.py"))


def edges() -> list[tuple[str, str, str]]:
    """(from package, to package, file:line) for every import between two of our packages."""
    out = []
    for path in pipeline_files():
        src = package_of(module_name(path))
        for target, line in imports(path):
            if target.split(".")[0] not in ("pipeline", "launch"):
                continue
            dst = package_of(target)
            if dst != src:
                out.append((src, dst, f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_every_package_has_a_layer() -> None:
    unknown = sorted({package_of(module_name(p)) for p in pipeline_files()} - set(LAYER))
    assert not unknown, f"packages without a layer in tests/test_layers.py: {unknown}; add them to LAYER"


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
        for src, dst, where in edges()
        if LAYER.get(dst, 99) > LAYER[src]
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    graph: dict[str, dict[str, str]] = {}
    for src, dst, where in edges():
        graph.setdefault(src, {}).setdefault(dst, where)
    cycles = []
    for start in sorted(graph):
        path = _path(graph, start, start, seen=set())
        if path:
            cycles.append(" -> ".join([start, *(f"{dst} ({where})" for dst, where in path)]))
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def _path(graph: dict[str, dict[str, str]], at: str, goal: str, seen: set[str]) -> list[tuple[str, str]] | None:
    for nxt, where in sorted(graph.get(at, {}).items()):
        if nxt == goal:
            return [(nxt, where)]
        if nxt not in seen:
            seen.add(nxt)
            rest = _path(graph, nxt, goal, seen)
            if rest:
                return [(nxt, where), *rest]
    return None


def _importers(library: str) -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in [*pipeline_files(), *sorted((ROOT / "launch").rglob("*.py"))]
        for target, _ in imports(path)
        if target.split(".")[0] == library
    }


def test_each_library_behind_its_seam() -> None:
    assert _importers("deepspeed") == {"pipeline/train/engine.py"}
    # The tracking package is mlflow's seam: the writer's backend and the readers (tracking/read.py).
    assert {p for p in _importers("mlflow") if not p.startswith("pipeline/tracking/")} == set()
    assert {p for p in _importers("submitit") if not p.startswith("launch/")} == set()


def test_the_check_sees_a_back_arrow(tmp_path: Path) -> None:
    """The parser finds imports inside functions, the kind that hid train -> finetune."""
    f = tmp_path / "m.py"
    f.write_text("def build():\n    from pipeline.finetune import freeze\n    import deepspeed\n")
    assert list(imports(f)) == [("pipeline.finetune", 2), ("deepspeed", 3)]
