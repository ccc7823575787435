"""Sweeps (launch/sweep.py, sweep_launch.py, sweep_table.py): expansion, refusals before anything is
queued, the local executor's scheduling, the --status table; then one real job array on the local
SLURM cluster (marked slurm) on which every end-to-end assertion is made.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch import cluster, submit, sweep, sweep_launch, sweep_table
from launch.cluster import FINAL_STATES
from launch.submit import Choice
from pipeline.config import ConfigError
from pipeline.tracking import find_run
from tests.launch.conftest import REPO, run_launcher, smoke_args


def test_axes_expand_to_their_cartesian_product_in_order() -> None:
    sets = sweep.expand(["optim.lr=1e-3,2e-3", "train.seed=1,2"])
    assert sets == [
        ("optim.lr=1e-3", "train.seed=1"),
        ("optim.lr=1e-3", "train.seed=2"),
        ("optim.lr=2e-3", "train.seed=1"),
        ("optim.lr=2e-3", "train.seed=2"),
    ]
    assert sweep.varying_keys(sets) == ["optim.lr", "train.seed"]
    assert sweep.split_values("0.9,[0.9,0.95],{a: 1, b: 2}") == ["0.9", "[0.9,0.95]", "{a: 1, b: 2}"]


def test_sweep_file_sets_cross_with_axes(tmp_path: Path) -> None:
    f = tmp_path / "sweep.yaml"
    f.write_text("- {optim.lr: 1e-3, model.depth: 2}\n- [optim.lr=.inf]\n- {optim.lr: 0.004, model.qkv_bias: true}\n")
    sets = sweep.expand(["train.seed=1,2"], f)
    assert len(sets) == 6
    assert sets[0] == ("optim.lr=1e-3", "model.depth=2", "train.seed=1")
    assert sets[3] == ("optim.lr=.inf", "train.seed=2")
    assert sets[5] == ("optim.lr=0.004", "model.qkv_bias=true", "train.seed=2")
    assert sweep.varying_keys(sets) == ["optim.lr", "model.depth", "train.seed", "model.qkv_bias"]


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        (["optim.lr="], "--sweep 'optim.lr=': empty value in the list of optim.lr"),
        (["optim.lr=1e-3,"], "--sweep 'optim.lr=1e-3,': empty value in the list of optim.lr"),
        (["optim.lr"], "is not of the form section.key=V1,V2"),
        (["optim.lr=1,1"], "repeats a value of optim.lr"),
        (["optim.lr=1", "optim.lr=2"], "--sweep names a key twice"),
    ],
)
def test_bad_axes_are_refused(axes: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        sweep.expand(axes)
    assert message in str(e.value)


def test_bad_sweep_files_are_refused(tmp_path: Path) -> None:
    cases = {"[]": "non-empty YAML list", "- 3\n": "entry 0 (3) is not a mapping", "{a: 1}": "non-empty YAML list"}
    for text, message in cases.items():
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            sweep.read_sweep_file(f)
        assert message in str(e.value)


def _launch(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = submit.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _nothing_left(sweep_dir: Path) -> None:
    """Refused before queueing: no sweep.json, and no member holds a lease or has a job.json."""
    assert not (sweep_dir / sweep.SWEEP_FILE).exists()
    for d in sweep_dir.glob("*/") if sweep_dir.exists() else []:
        assert not (d / "lease.json").exists() and not (d / "job.json").exists(), d


@pytest.mark.timeout(60)
def test_unknown_key_and_empty_list_are_refused_naming_them(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    base = smoke_args(synthetic_shards, tmp_path / "sw", "--local")
    rc, _, err = _launch([*base, "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "optim.lrr=1,2"], capsys)
    assert rc == 2
    assert "sweep member 0 (optim.lr=1e-3 optim.lrr=1): " in err
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in err and "nothing was submitted" in err
    rc, _, err = _launch([*base, "--sweep", "optim.lr="], capsys)
    assert rc == 2 and "empty value in the list of optim.lr" in err
    _nothing_left(tmp_path / "sw")


@pytest.mark.timeout(60)
def test_members_sharing_a_run_dir_are_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    # train.log_every does not change the recipe: both members would be runs/<name>-lr1e-3.
    args = smoke_args(synthetic_shards, tmp_path / "sw", "--local", "--sweep", "train.log_every=5,10")
    rc, _, err = _launch([*args, "--sweep", "optim.lr=1e-3"], capsys)
    assert rc == 2
    assert (
        "sweep member 0 (train.log_every=5 optim.lr=1e-3) and member 1 (train.log_every=10 optim.lr=1e-3) "
        f"would share the run dir {tmp_path / 'sw' / 'smoke-lr1e-3'}; they differ only in train.log_every"
    ) in err
    _nothing_left(tmp_path / "sw")


@pytest.mark.timeout(60)
def test_more_members_than_max_array_size_is_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submit, "choose_executor", lambda cfg: Choice("slurm", "a test's cluster"))
    monkeypatch.setattr(sweep_launch.cluster, "max_array_size", lambda: 3)
    args = smoke_args(synthetic_shards, tmp_path / "sw", "--sweep", "train.seed=1,2,3,4")
    rc, out, err = _launch(args, capsys)
    assert rc == 1 and "sweep " not in out  # refused before any member was built
    assert "the sweep has 4 members but this cluster's MaxArraySize is 3" in err and "nothing was submitted" in err
    _nothing_left(tmp_path / "sw")
    # launch.nodes changes the recipe (another run dir) but an array has one resource request.
    args = ["--config", "configs/smoke.yaml", "--run-dir", str(tmp_path / "sw"), f"data.path={synthetic_shards}",
            "model.num_classes=4", "--sweep", "launch.nodes=1,2"]  # fmt: skip
    rc, _, err = _launch(args, capsys)
    assert rc == 1
    assert "sweep member 1 (launch.nodes=2) asks for other resources (launch.*) than member 0" in err
    _nothing_left(tmp_path / "sw")


@pytest.mark.timeout(60)
def test_a_failing_member_check_releases_every_lease(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-such-data"
    args = smoke_args(
        synthetic_shards, tmp_path / "sw", "--local", "--sweep", f"data.path={synthetic_shards},{missing}"
    )
    rc, out, err = _launch(args, capsys)
    assert rc == 1, out + err
    assert "ok: member 0 (data.path=" in out  # member 0 passed its checks, then member 1 failed
    assert f"sweep member 1 (data.path={missing}): " in err and "nothing was submitted" in err
    _nothing_left(tmp_path / "sw")
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["smoke-data_no-such-data", "smoke-data_synthetic"]


@pytest.mark.timeout(60)
def test_dry_run_prints_the_expansion_and_checks_every_member(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    args = smoke_args(synthetic_shards, tmp_path / "sw", "--local", "--dry-run")
    rc, out, _ = _launch([*args, "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "train.seed=1,2"], capsys)
    assert rc == 0
    table = out[out.index("member  optim.lr") :].splitlines()[:6]
    assert [line.split() for line in table] == [
        ["member", "optim.lr", "train.seed", "run", "dir"],
        ["------", "--------", "----------", "------------------"],
        ["0", "1e-3", "1", "smoke-lr1e-3-seed1"],
        ["1", "1e-3", "2", "smoke-lr1e-3-seed2"],
        ["2", "2e-3", "1", "smoke-lr2e-3-seed1"],
        ["3", "2e-3", "2", "smoke-lr2e-3-seed2"],
    ]
    assert out.count("checks passed") == 4 and "dry run: nothing submitted" in out
    _nothing_left(tmp_path / "sw")


def test_default_sweep_dir_is_the_default_run_dir_plus_sweep(synthetic_shards: Path) -> None:
    args = submit.build_parser().parse_intermixed_args(["--config", "configs/smoke.yaml", "optim.warmup_steps=3"])
    cfg = submit.resolve_config(args)
    assert sweep.sweep_dir_for(cfg, args.overrides) == Path("runs/smoke-warmup3-sweep").absolute()
    args = submit.build_parser().parse_intermixed_args(["--config", "configs/smoke.yaml", "--run-dir", "x/y"])
    assert sweep.sweep_dir_for(submit.resolve_config(args), args.overrides) == Path("x/y").absolute()


class _FakeJob:
    """A local job that ends after ``polls`` state queries (COMPLETED, or FAILED)."""

    def __init__(self, log: list[str], name: str, polls: int, ok: bool) -> None:
        self.kind, self.job_id, self.folder = "local", str(os.getpid()), Path("/nonexistent")
        self.log, self.name, self.polls, self.ok = log, name, polls, ok

    def state(self) -> str:
        self.polls -= 1
        if self.polls > 0:
            return "RUNNING"
        self.log.append(f"end {self.name}")
        return "COMPLETED" if self.ok else "FAILED"


@pytest.mark.timeout(60)
def test_local_members_run_n_at_a_time_and_a_failure_stops_no_other(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    polls = {"seed1": 2, "seed2": 1, "seed3": 1}

    def fake_submit(plan, rank_job):  # noqa: ANN001, ANN202
        name = Path(rank_job.cfg.train.run_dir).name.rpartition("-")[2]
        log.append(f"start {name}")
        return _FakeJob(log, name, polls[name], ok=name != "seed2")

    monkeypatch.setattr(sweep_launch, "submit_job", fake_submit)
    monkeypatch.setattr(sweep_launch, "_reap", functools.partial(sweep_launch._reap, poll_s=0))
    args = smoke_args(
        synthetic_shards, tmp_path / "sw", "--local", "--max-parallel", "2", "--sweep", "train.seed=1,2,3"
    )
    rc, out, _ = _launch([*args, "tracking.enabled=false"], capsys)
    assert rc == 1  # seed2 failed
    # Two at a time: seed3 starts only when seed2 (the first to end) has ended; seed1 keeps running.
    assert log == ["start seed1", "start seed2", "end seed2", "start seed3", "end seed1", "end seed3"]
    record = json.loads((tmp_path / "sw" / sweep.SWEEP_FILE).read_text())
    assert [m["job_id"] for m in record["members"]] == [str(os.getpid())] * 3
    assert record["submissions"][0]["max_parallel"] == 2 and record["parent_run_id"] is None
    assert "[sweep] member 1 (local job" in out and "ended: FAILED" in out


def _member_files(run_dir: Path, *, result: str, step: int, top1: list[float], error: str = "") -> None:
    """What a finished member leaves: job.json (a local job whose controller is gone), config, metrics."""
    run_dir.mkdir(parents=True)
    attempt = {"job_id": "999999999", "restart": 0, "hosts": ["h"], "started": "x", "ended": "y", "result": result}
    data = {"name": "smoke", "jobs": [{"job_id": "999999999", "executor": "local", "folder": str(run_dir)}],
            "attempts": [{**attempt, "step": step}], "requeues": 0}  # fmt: skip
    if error:
        data["failures"] = [{"job_id": "999999999", "restart": 0, "rank": 0, "host": "h", "time": 1.0, "at": "t",
                             "error": error, "secondary": False}]  # fmt: skip
    (run_dir / "job.json").write_text(json.dumps(data))
    (run_dir / "config.yaml").write_text("train:\n  steps: 30\n")
    records = [{"step": s, "time": float(s), "train/loss": 1.0} for s in range(5, step + 1, 5)]
    records += [{"step": step, "time": 99.0, "eval/top1": t} for t in top1]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_status_table_one_row_per_member_with_the_failure(tmp_path: Path) -> None:
    members = [("optim.lr=1e-3",), ("optim.lr=.inf",)]
    dirs = [tmp_path / "smoke-lr1e-3", tmp_path / "smoke-lr.inf"]
    _member_files(dirs[0], result="completed", step=30, top1=[0.5, 0.875])
    _member_files(dirs[1], result="failed", step=5, top1=[], error="NonFiniteError: non-finite loss/gradients")
    ms = [sweep.Member(i, o, submit.resolve_config(submit.build_parser().parse_intermixed_args(
        ["--run-dir", str(d), *o]))) for i, (o, d) in enumerate(zip(members, dirs, strict=True))]  # fmt: skip
    sweep.write_record(tmp_path, sweep.new_record("smoke-1234", {}, ms))
    text = sweep_table.summarise(tmp_path)
    lines = text.splitlines()
    assert lines[0] == f"sweep smoke-1234: {tmp_path}, 2 members (1 COMPLETED, 1 FAILED)"
    assert [line.split() for line in lines[1:5]] == [
        ["member", "optim.lr", "state", "step", "best", "top-1", "run"],
        ["------", "--------", "---------", "-----", "----------", "---"],
        ["0", "1e-3", "COMPLETED", "30/30", "0.8750", "-"],
        ["1", ".inf", "FAILED", "5/30", "-", "-"],
    ]
    assert lines[5] == (
        "  failed: member 1 (optim.lr=.inf): FAILED: rank 0 on h at t: NonFiniteError: non-finite loss/gradients"
    )
    assert submit.main(["--status", str(tmp_path)]) == 0


# --- the real local 2-node SLURM cluster: one job array, all assertions on one sweep ---------------

# A 2x2 grid (optim.lr x train.seed) written as a sweep file, whose last cell's learning rate is
# infinite: it passes validation (> 0) but the first update makes every weight non-finite, so that
# member fails at run time (NonFiniteError) while the other three complete.
GRID = "- {optim.lr: 2e-3, train.seed: 1}\n- {optim.lr: 2e-3, train.seed: 2}\n- {optim.lr: 4e-3, train.seed: 1}\n" \
       "- {optim.lr: .inf, train.seed: 2}\n"  # fmt: skip
LABELS = ["smoke-lr2e-3-seed1", "smoke-lr2e-3-seed2", "smoke-lr4e-3-seed1", "smoke-lr.inf-seed2"]


@dataclass
class SweepRun:
    sweep_dir: Path
    array_id: str
    stdout: str
    most_running: int  # the most array tasks seen RUNNING at once
    saved_on_usr2: int  # the step member 0 saved when preempted


def _task_states(array_id: str, env: dict[str, str]) -> dict[str, str]:
    """Array task id -> state, from sacct (squeue forgets tasks that ended)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", array_id], env=env,
                         capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    rows = (line.partition("|") for line in out.splitlines())
    return {jid: state.split()[0] for jid, _, state in rows if "_" in jid and "[" not in jid}  # not the pending rest


def _running(array_id: str, env: dict[str, str]) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-t", "RUNNING", "-o", "%i"], env=env,
                         capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return len(out.split())


def _member_log(sweep_dir: Path, task: str) -> str:
    files = [sweep_dir / "submitit" / task / f"{task}_0_log.{ext}" for ext in ("out", "err")]
    return "".join(f.read_text() for f in files if f.exists())


@pytest.fixture(scope="module")
def sweep_on_slurm(slurm_env, synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """4 members (1 node x 1 rank each), at most 2 at once; member 0 gets USR2 mid-run and must requeue.
    The last rank pauses 8 s in its step-10 save (SAVE_PAUSE_ENV), so the signal lands mid-run."""
    from pipeline.train.saving import SAVE_PAUSE_ENV

    root = tmp_path_factory.mktemp("sweep")
    (root / "grid.yaml").write_text(GRID)
    sweep_dir = root / "lr-sweep"
    args = ["--config", "configs/smoke.yaml", "--nodes", "1", "--run-dir", str(sweep_dir), "launch.ranks_per_node=1",
            f"data.path={synthetic_shards}", "model.num_classes=4", "train.steps=20",
            "--sweep-file", str(root / "grid.yaml"), "--max-parallel", "2"]  # fmt: skip
    out = run_launcher(args, env={**slurm_env, SAVE_PAUSE_ENV: "8@10"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    match = re.search(r"^submitted slurm job array (\d+): 4 members, at most 2 at once", out.stdout, re.MULTILINE)
    assert match, out.stdout
    array_id, most = match.group(1), 0
    first, signal = f"{array_id}_0", None
    try:
        _wait_for(lambda: "step 10/20" in _member_log(sweep_dir, first), 240, "member 0's step 10")
        # scancel keeps retrying while the task is "in transition" (this one saves and requeues itself within
        # seconds) and would signal the requeued attempt too: stopped once the requeue is logged.
        signal = subprocess.Popen(["scancel", "--signal=USR2", first], env=slurm_env)
        _wait_for(lambda: f"Requeued job {first}" in _member_log(sweep_dir, first), 120, "member 0's requeue")
        signal.kill()
        deadline = time.monotonic() + 420
        while len([s for s in _task_states(array_id, slurm_env).values() if s in FINAL_STATES]) < 4:
            assert time.monotonic() < deadline, f"sweep not done: {_task_states(array_id, slurm_env)}"
            most = max(most, _running(array_id, slurm_env))
            time.sleep(1)
    finally:
        if signal is not None and signal.poll() is None:
            signal.kill()
            signal.wait()
        subprocess.run(["scancel", array_id], env=slurm_env, capture_output=True, timeout=30)
    attempts = json.loads((sweep_dir / LABELS[0] / "job.json").read_text())["attempts"]
    return SweepRun(sweep_dir, array_id, out.stdout, most, attempts[0].get("step", -1))


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(1)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sweep_array_members_requeue_fail_alone_and_group_in_mlflow(sweep_on_slurm: SweepRun, slurm_env) -> None:
    sweep_dir, array_id = sweep_on_slurm.sweep_dir, sweep_on_slurm.array_id
    script = (sweep_dir / "submitit" / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --nodes=1" in script
    assert sweep_on_slurm.most_running <= 2
    tasks = [f"{array_id}_{i}" for i in range(4)]
    assert _task_states(array_id, slurm_env) == dict(zip(tasks, ["COMPLETED"] * 3 + ["FAILED"], strict=True))
    record = json.loads((sweep_dir / sweep.SWEEP_FILE).read_text())
    assert [m["job_id"] for m in record["members"]] == tasks
    assert [Path(m["run_dir"]).name for m in record["members"]] == LABELS
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "job.json").exists()) == sorted(LABELS)

    # Member 0: preempted by USR2, requeued within the array, resumed where it saved, in one MLflow run.
    dirs = [sweep_dir / label for label in LABELS]
    results = [[a["result"] for a in json.loads((d / "job.json").read_text())["attempts"]] for d in dirs]
    assert results == [["preempted", "completed"], ["completed"], ["completed"], ["failed"]]
    saved = sweep_on_slurm.saved_on_usr2
    assert 10 <= saved < 20
    log = _member_log(sweep_dir, tasks[0])
    assert f"resumed from {dirs[0]}/checkpoints/step_{saved:08d} (step {saved}," in log
    attempts0 = json.loads((dirs[0] / "job.json").read_text())["attempts"]
    assert attempts0[0]["mlflow_run_id"] == attempts0[1]["mlflow_run_id"]

    # MLflow: 4 member runs under one parent, each tagged with the sweep id.
    from mlflow import MlflowClient

    parent_id, uri = record["parent_run_id"], record["tracking_uri"]
    client = MlflowClient(uri)
    runs = [client.get_run(find_run(d).run_id) for d in dirs]
    assert [r.info.run_id for r in runs][0] == attempts0[0]["mlflow_run_id"]
    assert [r.data.tags["sweep.id"] for r in runs] == [record["sweep_id"]] * 4
    assert [r.data.tags["mlflow.parentRunId"] for r in runs] == [parent_id] * 4
    # Named as a single submit with the same overrides would be: the base's recipe overrides, then the member's.
    assert [r.info.run_name for r in runs] == [f"smoke-data_synthetic-num_classes4-steps20-{x[6:]}" for x in LABELS]
    assert [r.info.status for r in runs] == ["FINISHED"] * 3 + ["FAILED"]
    assert runs[0].data.tags["slurm.restart_count"] == "1"
    parent = client.get_run(parent_id)
    assert parent.data.tags["sweep.id"] == record["sweep_id"] and parent.data.params["sweep.members"] == "4"
    assert parent.data.params["sweep.varying"] == "optim.lr,train.seed"

    # --status: one row per member, with the numbers the members' own files hold.
    status = run_launcher(["--status", str(sweep_dir)], env=slurm_env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"sweep {record['sweep_id']}: {sweep_dir}, 4 members (3 COMPLETED, 1 FAILED)"
    best = [max(float(json.loads(x).get("eval/top1", -1)) for x in (d / "metrics.jsonl").read_text().split("\n") if x)
            for d in dirs[:3]]  # fmt: skip
    rows = [line.split() for line in lines[2:7]]
    assert rows[0][:6] == ["member", "optim.lr", "train.seed", "state", "step", "best"]
    assert [r[:6] for r in rows[2:5]] == [
        ["0", "2e-3", "1", "COMPLETED", "20/20", f"{best[0]:.4f}"],
        ["1", "2e-3", "2", "COMPLETED", "20/20", f"{best[1]:.4f}"],
        ["2", "4e-3", "1", "COMPLETED", "20/20", f"{best[2]:.4f}"],
    ]
    assert [r[6] for r in rows[2:5]] == [r.info.run_id for r in runs[:3]]  # the local store: run ids
    assert lines[7].split()[:4] == ["3", ".inf", "2", "FAILED"]
    failed = next(line for line in lines if line.startswith("  failed: "))
    assert failed.startswith("  failed: member 3 (optim.lr=.inf train.seed=2): FAILED: rank 0 on node")
    assert "NonFiniteError: non-finite loss/gradients at steps" in failed

    # compare: best eval/top1 first (the failed member, without one, last), the UI URL of the top 2.
    cmp = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), str(sweep_dir), "--top", "2"],
                         cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr
    table = cmp.stdout.splitlines()
    top1 = [r.data.metrics["eval/top1"] for r in runs[:3]]
    order = sorted(range(3), key=lambda i: -top1[i]) + [3]
    assert [line.split()[0] for line in table[3:7]] == [str(i) for i in order]
    assert [line.split()[5] for line in table[3:6]] == [f"{top1[i]:.4f}" for i in order[:3]]
    url = next(line for line in table if line.startswith("MLflow UI compare page: "))
    ids = [runs[i].info.run_id for i in order[:2]]
    assert all(i in url for i in ids) and runs[order[2]].info.run_id not in url


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_bad_sweeps_are_refused_before_the_real_cluster_queues_anything(
    slurm_env, synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    limit = cluster.max_array_size()  # scontrol show config
    assert limit is not None and limit > 4
    cases = {
        f"train.seed={','.join(map(str, range(limit + 1)))}": (
            1, f"the sweep has {limit + 1} members but this cluster's MaxArraySize is {limit}"),
        "optim.lrr=1,2": (2, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        "optim.lr=": (2, "empty value in the list of optim.lr"),
        "train.log_every=5,10": (2, "would share the run dir"),
    }  # fmt: skip
    queued = ["squeue", "-h", "-n", "smoke-sweep", "-t", "PENDING,RUNNING", "-o", "%i"]  # a sweep array's name
    for axis, (code, message) in cases.items():
        out = run_launcher([*smoke_args(synthetic_shards, tmp_path / "sw"), "--sweep", axis], env=slurm_env)
        assert out.returncode == code and message in out.stderr, (axis[:40], out.stdout[-2000:], out.stderr[-2000:])
        assert "executor: slurm" in out.stdout or code == 2
        _nothing_left(tmp_path / "sw")
        assert subprocess.run(queued, env=slurm_env, capture_output=True, text=True, timeout=30).stdout == ""
