"""What really failed, from any rank: the first failing rank's own error (not rank 0's "lost its
peer") in --follow, job.json and --status; a job whose rank 0 was SIGKILLed is reconciled by the
next --status (attempt and MLflow run KILLED) instead of "running" forever."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.proc import pid_alive
from pipeline.tracking import find_run
from tests.launch.conftest import REPO, SUBMIT, run_launcher, smoke_args, submitted_job_id

DATA_ERROR = "DataError: data: 40 of 48 samples read on rank 1 were skipped (83.33%), above data.max_skip_frac"


@pytest.mark.timeout(600)
def test_rank_1s_data_error_is_what_follow_job_json_and_status_report(
    tmp_path: Path, synthetic_shards: Path, no_slurm_env: dict[str, str]
) -> None:
    run_dir, host = tmp_path / "run", socket.gethostname()
    env = {**no_slurm_env, "PIPELINE_INJECT_DATA_ERROR": "1@8"}
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), "--follow"], env=env, timeout=560)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = submitted_job_id(out.stdout)
    assert f"[launch] job {job_id} ended: FAILED" in out.stdout
    assert f"[launch] first failure: rank 1 on {host} at " in out.stdout
    assert f": {DATA_ERROR}" in out.stdout

    job = json.loads((run_dir / "job.json").read_text())
    (attempt,) = job["attempts"]
    assert attempt["result"] == "failed"
    assert (attempt["failure"]["rank"], attempt["failure"]["host"]) == (1, host)
    assert attempt["failure"]["error"].startswith(DATA_ERROR)
    by_rank = {f["rank"]: f for f in job["failures"]}
    assert sorted(by_rank) == [0, 1]
    assert by_rank[1]["secondary"] is False and by_rank[1]["job_id"] == job_id
    assert by_rank[0]["secondary"] is True, by_rank[0]["error"]  # rank 0 only lost its peer

    status = run_launcher(["--status", str(run_dir)], env=no_slurm_env)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id} (local, 2 node(s) x 1 tasks): FAILED" in status.stdout
    assert "attempt restart=0: failed" in status.stdout
    assert f"first failure: rank 1 on {host} at " in status.stdout and DATA_ERROR in status.stdout


def _rank_pid(controller: int, rank: int) -> int | None:
    """The rank process the local controller started (its children; loader workers are grandchildren)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == controller and f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in environ:
            return int(proc.name)
    return None


def _wait(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_rank_0_sigkilled_the_next_status_marks_attempt_and_mlflow_run_killed(
    tmp_path: Path, synthetic_shards: Path, no_slurm_env: dict[str, str], mlflow_server
) -> None:
    run_dir = tmp_path / "run"
    args = smoke_args(
        synthetic_shards, run_dir, "train.steps=400", "train.log_every=1", "checkpoint.every_steps=0",
        f"tracking.uri={mlflow_server.url}", "tracking.system_metrics=false",
    )  # fmt: skip
    # Into a file, not a pipe: the local job inherits the launcher's output and outlives it.
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        out = subprocess.run(
            [sys.executable, str(SUBMIT), *args], cwd=REPO, env=no_slurm_env, stdout=f, stderr=subprocess.STDOUT,
            timeout=400,
        )  # fmt: skip
    assert out.returncode == 0, log.read_text()
    job_id = submitted_job_id(log.read_text())
    metrics = run_dir / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 420, "5 logged steps")
    rank0 = _rank_pid(int(job_id), 0)
    assert rank0 is not None
    assert find_run(run_dir).status == "RUNNING"
    os.kill(rank0, signal.SIGKILL)
    _wait(lambda: not pid_alive(int(job_id)), 120, "the local job to end after rank 0 was killed")

    job = json.loads((run_dir / "job.json").read_text())
    assert "ended" not in job["attempts"][0]  # nobody closed it: the job is gone, job.json says running
    status = run_launcher(["--status", str(run_dir)], env=no_slurm_env, timeout=300)
    assert status.returncode == 0, status.stderr
    run = find_run(run_dir)
    assert f"reconciled: attempt restart=0 of job {job_id}: was 'running', is killed" in status.stdout
    assert f"reconciled: MLflow run {run.run_id} marked KILLED: its job ended without ending it" in status.stdout
    assert f"job {job_id} (local, 2 node(s) x 1 tasks): KILLED" in status.stdout
    assert "no rank reported an error of its own: a rank was killed from outside" in status.stdout
    assert run.status == "KILLED"
    job = json.loads((run_dir / "job.json").read_text())
    assert job["attempts"][0]["result"] == "killed" and "reconciled" in job["attempts"][0]
    again = run_launcher(["--status", str(run_dir)], env=no_slurm_env, timeout=300)
    assert "reconciled" not in again.stdout and "KILLED" in again.stdout  # once, then stable
