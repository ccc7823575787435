"""A sweep: many runs of one config that differ in a few overrides, submitted together.

    python launch/submit.py --config configs/smoke.yaml --sweep optim.lr=1e-3,2e-3 --sweep train.seed=1,2
    python launch/submit.py --config configs/smoke.yaml --sweep-file lrs.yaml --max-parallel 2

``--sweep KEY=V1,V2`` (repeatable) is the cartesian product of its values; ``--sweep-file`` is a
YAML list of override sets (``- {optim.lr: 1e-3, model.depth: 2}`` or ``- [optim.lr=1e-3]``),
crossed with any ``--sweep``. Each member is a full run: the base overrides plus its own, in its
own run dir ``SWEEP_DIR/<name>-<its recipe overrides>`` (named like a default run dir, so the
MLflow run name matches it). ``SWEEP_DIR/sweep.json`` records the definition, the members, their
jobs and the parent MLflow run. This module is pure bookkeeping: expansion, validation, the
record; launch/sweep_launch.py submits, launch/sweep_table.py reports.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError
from pipeline.config.recipe import changes_recipe, run_label
from pipeline.config.schema import default_run_dir
from pipeline.durable import atomic_write

SWEEP_FILE = "sweep.json"
SWEEP_SUFFIX = "-sweep"
# Tag keys every member's MLflow run carries; MLflow's UI nests a run under its mlflow.parentRunId.
TAG_SWEEP_ID = "sweep.id"
TAG_PARENT_RUN = "mlflow.parentRunId"


def split_values(raw: str) -> list[str]:
    """``1e-3,[0.9,0.95]`` -> ``["1e-3", "[0.9,0.95]"]``: commas inside brackets or braces stay."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(raw):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values]


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``--sweep optim.lr=1e-3,2e-3`` -> ``("optim.lr", ["1e-3", "2e-3"])``; refuses an empty list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--sweep {text!r} is not of the form section.key=V1,V2 (e.g. --sweep optim.lr=1e-3,3e-3)")
    values = split_values(raw)
    if not raw.strip() or any(v == "" for v in values):
        raise ConfigError(
            f"--sweep {text!r}: empty value in the list of {key}; give one or more comma-separated values "
            f"(e.g. --sweep {key}=1,2)"
        )
    if len(set(values)) < len(values):
        raise ConfigError(f"--sweep {text!r} repeats a value of {key}; each value makes one run")
    return key, values


def _spell(value: Any) -> str:
    """A YAML value back as an override's text (``True`` -> ``true``, ``inf`` -> ``.inf``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return value if isinstance(value, str) else json.dumps(value)


def read_sweep_file(path: str | Path) -> list[tuple[str, ...]]:
    """The override sets of a sweep file: a YAML list of mappings or of ``key=value`` lists."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"--sweep-file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--sweep-file {path}: not valid YAML ({e})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--sweep-file {path} must hold a non-empty YAML list of override sets, e.g. "
                          "- {optim.lr: 1e-3}")  # fmt: skip
    sets = []
    for n, entry in enumerate(data):
        if isinstance(entry, dict) and entry:
            sets.append(tuple(f"{k}={_spell(v)}" for k, v in entry.items()))
        elif isinstance(entry, list) and entry and all(isinstance(x, str) and "=" in x for x in entry):
            sets.append(tuple(entry))
        else:
            raise ConfigError(
                f"--sweep-file {path}: entry {n} ({entry!r}) is not a mapping of dotted keys to values "
                "({optim.lr: 1e-3}) nor a list of key=value strings ([optim.lr=1e-3])"
            )
    return sets


def expand(axes: Sequence[str], sweep_file: str | Path | None = None) -> list[tuple[str, ...]]:
    """Every member's own overrides: the sweep file's sets (if any) crossed with each ``--sweep`` axis."""
    sets: list[tuple[str, ...]] = read_sweep_file(sweep_file) if sweep_file else [()]
    parsed = [parse_axis(a) for a in axes]
    keys = [k for k, _ in parsed]
    if len(set(keys)) < len(keys):
        raise ConfigError(f"--sweep names a key twice ({', '.join(keys)}); give all its values in one --sweep")
    grid = list(itertools.product(*[[f"{k}={v}" for v in values] for k, values in parsed]))
    return [(*base, *cell) for base in sets for cell in grid] if parsed else sets


def varying_keys(members: Sequence[Sequence[str]]) -> list[str]:
    """The dotted keys whose value is not the same in every member (in order of first appearance)."""
    given = [dict(item.partition("=")[::2] for item in own) for own in members]
    order = dict.fromkeys(k for g in given for k in g)
    return [k for k in order if len({g.get(k) for g in given}) > 1]


def member_label(base_name: str, own: Sequence[str]) -> str:
    """A member's run dir name: ``smoke-lr1e-3-seed2`` (recipe.run_label: the run name rule)."""
    return run_label(base_name, list(own))


def sweep_dir_for(cfg: Config, overrides: Sequence[str]) -> Path:
    """The sweep's dir: the run dir the user named, else the default run dir plus ``-sweep``."""
    default = Path(default_run_dir(cfg.name, list(overrides))).absolute()
    if Path(cfg.train.run_dir) != default:
        return Path(cfg.train.run_dir)
    return default.with_name(default.name + SWEEP_SUFFIX)


@dataclass(frozen=True)
class Member:
    index: int
    overrides: tuple[str, ...]  # its own (the sweep's), after the base overrides
    cfg: Config  # validated, train.run_dir = its run dir

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    def describe(self) -> str:
        return f"member {self.index} ({' '.join(self.overrides) or 'no overrides'})"


def build_members(
    sets: Sequence[tuple[str, ...]], sweep_dir: Path, base_name: str, resolve: Callable[[list[str], Path], Config]
) -> list[Member]:
    """Validate every member's config (``resolve(own overrides, run dir)``: the submitter's path)
    and refuse two members that would share a run dir; a ConfigError names the member."""
    members = []
    for i, own in enumerate(sets):
        try:
            cfg = resolve(list(own), sweep_dir / member_label(base_name, own))
        except ConfigError as e:
            raise ConfigError(f"sweep member {i} ({' '.join(own)}): {e}") from None
        members.append(Member(i, tuple(own), cfg))
    _refuse_shared_run_dirs(members)
    return members


def _refuse_shared_run_dirs(members: Sequence[Member]) -> None:
    seen: dict[Path, Member] = {}
    for m in members:
        other = seen.setdefault(m.run_dir, m)
        if other is m:
            continue
        same_recipe = sorted({i.partition("=")[0] for i in (*m.overrides, *other.overrides)} - _recipe_keys(m, other))
        why = f"; they differ only in {', '.join(same_recipe)}, which do not change the recipe" if same_recipe else ""
        raise ConfigError(
            f"sweep {other.describe()} and {m.describe()} would share the run dir {m.run_dir}{why}: a run dir "
            "holds one run; sweep keys that change what is trained, or drop the duplicate"
        )


def _recipe_keys(a: Member, b: Member) -> set[str]:
    return {i.partition("=")[0] for i in (*a.overrides, *b.overrides) if changes_recipe(i.partition("=")[0])}


def new_record(sweep_id: str, definition: dict[str, Any], members: Sequence[Member]) -> dict[str, Any]:
    """What sweep.json holds before submission (job ids and the parent run are added by the launcher)."""
    varying = varying_keys([m.overrides for m in members])
    return {
        "sweep_id": sweep_id,
        "definition": definition,
        "varying": varying,
        "members": [
            {"index": m.index, "overrides": list(m.overrides), "run_dir": str(m.run_dir), "job_id": None}
            for m in members
        ],
        "submissions": [],
        "parent_run_id": None,  # the parent MLflow run (None: tracking off), with its store and experiment
        "tracking_uri": None,
        "experiment_id": None,
    }


def write_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / SWEEP_FILE, json.dumps(record, indent=2) + "\n")


def read_record(sweep_dir: str | Path) -> dict[str, Any]:
    """SWEEP_DIR/sweep.json; FileNotFoundError when ``sweep_dir`` is not a sweep's dir."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {sweep_dir} is not a sweep dir made by --sweep") from None


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def overrides_cell(own: Sequence[str], varying: Sequence[str]) -> list[str]:
    """One cell per varying key: this member's value of it (``-``: the base config's)."""
    given = dict(item.partition("=")[::2] for item in own)
    return [given.get(k, "-") for k in varying]
