"""One job per run dir: two real launches at the same moment, tracking off; the lease's life."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train import lease
from tests.launch.conftest import REPO, SUBMIT, run_launcher, smoke_args, submitted_job_id

STEPS = 8


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUBMIT), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.timeout(600)  # 2 ranks train under --follow; slow when the shared machine is loaded
def test_two_launches_at_the_same_moment_one_runs_the_other_is_refused(
    tmp_path: Path, synthetic_shards: Path, no_slurm_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "shared"
    args = [*smoke_args(synthetic_shards, run_dir, "--local", "--follow"), "tracking.enabled=false",
            f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every_steps=4"]  # fmt: skip
    procs = [_launch(args, no_slurm_env), _launch(args, no_slurm_env)]  # started together
    holders: list[lease.Holder] = []
    deadline = time.monotonic() + 540
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        h = lease.read(run_dir)
        if h is not None and h.role == "job":
            holders.append(h)
        time.sleep(0.2)
    outs = [(p.wait(timeout=30), *p.communicate()) for p in procs]
    ran = [o for o in outs if o[0] == 0]
    refused = [o for o in outs if o[0] != 0]
    assert len(ran) == 1 and len(refused) == 1, outs
    rc, out, err = refused[0]
    assert rc == 1 and "submitted" not in out
    assert f"error: run dir {run_dir} is in use by " in err and f"on host {socket.gethostname()} (pid " in err
    assert ", since 20" in err and "last heartbeat" in err
    assert "Wait for that job to end, cancel it (`kill " in err and "--force-unlock" in err
    assert err.rstrip().endswith("nothing was submitted")

    job_id = submitted_job_id(ran[0][1])
    assert f"[launch] job {job_id} ended: COMPLETED" in ran[0][1]
    job = json.loads((run_dir / "job.json").read_text())
    assert [j["job_id"] for j in job["jobs"]] == [job_id]  # only one job was ever queued
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))  # one job's steps, once
    # While it ran, the job's rank 0 held the lease (adopted from the launcher, same token) and beat.
    assert holders and {(h.job_id, h.executor) for h in holders} == {(job_id, "local")}
    assert len({h.token for h in holders}) == 1 and all(
        h.pid != procs[0].pid and h.pid != procs[1].pid for h in holders
    )
    assert not (run_dir / lease.LEASE).exists()  # released at the end


@pytest.mark.timeout(120)
def test_a_stale_lease_is_taken_over_and_a_live_one_refuses_before_anything_is_queued(
    tmp_path: Path, synthetic_shards: Path, no_slurm_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600
    stale = lease.Holder("t-dead", "job", "someone", socket.gethostname(), dead.pid, "1", "local", None, old, old)
    (run_dir / lease.LEASE).write_text(json.dumps(stale.__dict__))
    out = run_launcher([*smoke_args(synthetic_shards, run_dir, "--local", "--dry-run")], env=no_slurm_env)
    assert out.returncode == 0, out.stderr
    assert (
        "ok: run dir: a launch would take over the stale lease of a run started without a scheduler of user someone"
        in out.stdout
    )
    assert f"its process (pid {dead.pid}) on {socket.gethostname()} is gone" in out.stdout
    # The real launch takes it over with a note, then (refused by the data preflight) lets it go again.
    out = run_launcher(smoke_args(synthetic_shards, run_dir, "--local", "data.num_workers=16"), env=no_slurm_env)
    assert out.returncode == 1 and "data preflight for 2 ranks x 16 workers failed" in out.stderr
    assert (
        f"note: took over the lease of {run_dir} from a run started without a scheduler of user someone" in out.stdout
    )
    assert re.search(rf"last heartbeat 36\d\d s ago: its process \(pid {dead.pid}\) on {socket.gethostname()} is gone",
                     out.stdout)  # fmt: skip
    assert not (run_dir / lease.LEASE).exists() and not (run_dir / "job.json").exists()
    # A live holder (this test's own process): the real launch is refused before anything is queued.
    live = lease.this_process("t-live", "job", executor="local", job_id=str(os.getpid()))
    (run_dir / lease.LEASE).write_text(json.dumps(live.__dict__))
    out = run_launcher(smoke_args(synthetic_shards, run_dir, "--local"), env=no_slurm_env)
    assert out.returncode == 1
    assert f"is in use by job {os.getpid()} (local) of user {live.user}" in out.stderr
    assert not (run_dir / "job.json").exists() and not (run_dir / "submitit").exists()
    assert lease.read(run_dir).token == "t-live"
