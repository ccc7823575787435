"""A sweep's table, one row per member: the overrides that vary, state, step, best eval top-1, run.

``launch/submit.py --status SWEEP_DIR`` prints it from the members' own files (job.json, SLURM's
accounting, metrics.jsonl, tracking.json: no tracking server needed); ``launch/compare.py
SWEEP_DIR`` sorts it by a metric read from MLflow and prints the UI's compare URL for the top k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import progress, status, sweep
from launch.jobfile import describe_failure, first_failure, read_job_file
from pipeline.tracking import RunSummary, find_run, format_table, ui_run_url
from pipeline.tracking.uris import is_remote


def expansion(record: dict[str, Any]) -> str:
    """The members before submission: index, the values of the varying keys, run dir."""
    varying = record["varying"]
    rows = [
        [str(m["index"]), *sweep.overrides_cell(m["overrides"], varying), Path(m["run_dir"]).name]
        for m in record["members"]
    ]
    return _table(["member", *varying, "run dir"], rows)


@dataclass(frozen=True)
class MemberState:
    state: str  # SLURM-style: PENDING, RUNNING, COMPLETED, FAILED, ... ("not submitted")
    step: str  # "30/30", "-"
    best_top1: float | None
    run: str  # the MLflow run's page (a server) or its id (a local store); "-" before it exists
    error: str  # why it failed ("" when it did not)


def member_state(run_dir: Path) -> MemberState:
    data = read_job_file(run_dir)
    if not data.get("jobs"):
        return MemberState("not submitted", "-", None, "-", "")
    states = status.job_states(data)
    if status.reconcile(run_dir, data, states):  # jobs gone without a result: their attempts closed
        data = read_job_file(run_dir)
        states = status.job_states(data)
    newest = data["jobs"][-1]["job_id"]
    p = progress.read_progress(run_dir)
    step = f"{p.step}/{p.total}" if p else "-"
    return MemberState(states[newest], step, p.best_top1 if p else None, _run_cell(run_dir), _error(data, newest))


def _error(data: dict[str, Any], job_id: str) -> str:
    """The newest attempt's first failure (rank, host, error), else its recorded error."""
    attempts = [a for a in data.get("attempts", []) if a["job_id"] == job_id]
    if not attempts or attempts[-1].get("result") not in ("failed", "killed"):
        return ""
    first = first_failure(data, attempts[-1])
    if first is not None:
        return describe_failure(first)
    return attempts[-1].get("error") or attempts[-1].get("reconciled") or "no rank reported an error"


def _run_cell(run_dir: Path) -> str:
    ref = progress.run_ref(run_dir)
    return "-" if ref is None else ref[2] or ref[0]


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def rows(record: dict[str, Any], states: dict[int, MemberState]) -> list[list[str]]:
    varying = record["varying"]
    return [
        [str(m["index"]), *sweep.overrides_cell(m["overrides"], varying), states[m["index"]].state,
         states[m["index"]].step, _fmt(states[m["index"]].best_top1), states[m["index"]].run]
        for m in record["members"]
    ]  # fmt: skip


def failures(record: dict[str, Any], states: dict[int, MemberState]) -> list[str]:
    """One line per failed member: which one, and why."""
    return [
        f"member {m['index']} ({' '.join(m['overrides'])}): {states[m['index']].state}: {states[m['index']].error}"
        for m in record["members"]
        if states[m["index"]].error
    ]


HEADERS = ("state", "step", "best top-1", "run")


def summarise(sweep_dir: str | Path) -> str:
    """The --status text of a sweep dir; FileNotFoundError when it has no sweep.json."""
    sweep_dir = Path(sweep_dir)
    record = sweep.read_record(sweep_dir)
    states = {m["index"]: member_state(Path(m["run_dir"])) for m in record["members"]}
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    lines = [
        f"sweep {record['sweep_id']}: {sweep_dir}, {len(states)} members ("
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + ")"
    ]
    if record.get("parent_run_id"):
        lines.append(f"  parent MLflow run: {_parent_link(record)}")
    lines.append(_table(["member", *record["varying"], *HEADERS], rows(record, states)))
    lines += [f"  failed: {line}" for line in failures(record, states)]
    lines.append(f"  one member: python launch/submit.py --status {sweep_dir}/<run dir>")
    return "\n".join(lines)


def _parent_link(record: dict[str, Any]) -> str:
    uri, run_id = str(record.get("tracking_uri", "")), str(record["parent_run_id"])
    return ui_run_url(uri, str(record.get("experiment_id", "0")), run_id) if is_remote(uri) else f"{run_id} in {uri}"


@dataclass(frozen=True)
class Ranked:
    member: dict[str, Any]  # sweep.json's entry
    state: MemberState
    run: RunSummary | None  # None: the member has no MLflow run (yet)


def ranked(sweep_dir: str | Path, metric: str, uri: str | None = None) -> list[Ranked]:
    """The members, best ``metric`` (MLflow's final value) first; lower is better for a loss.
    Members without the metric come last, in sweep order."""
    record = sweep.read_record(sweep_dir)
    out = []
    for m in record["members"]:
        run_dir = Path(m["run_dir"])
        try:
            run = find_run(run_dir, uri=uri)
        except ValueError:
            run = None
        out.append(Ranked(m, member_state(run_dir), run))
    sign = 1.0 if "loss" in metric else -1.0

    def key(r: Ranked) -> tuple[bool, float]:
        value = r.run.metrics.get(metric) if r.run else None
        return (value is None, sign * value if value is not None else 0.0)

    return sorted(out, key=key)


def compare_table(record: dict[str, Any], entries: list[Ranked], metrics: tuple[str, ...]) -> str:
    """The compare table: one row per member in ``entries``' order, a column per metric."""
    varying = record["varying"]
    body = []
    for r in entries:
        values = [r.run.metrics.get(k) if r.run else None for k in metrics]
        body.append([str(r.member["index"]), *sweep.overrides_cell(r.member["overrides"], varying), r.state.state,
                     r.state.step, *map(_fmt, values), r.run.run_id if r.run else "-"])  # fmt: skip
    return _table(["member", *varying, "state", "step", *metrics, "run id"], body)


def _table(headers: list[str], body: list[list[str]]) -> str:
    """One row per member, under a header row (the compare CLI's table layout)."""
    return format_table([(str(r[0]), [str(c) for c in r[1:]]) for r in [headers, *body]])
