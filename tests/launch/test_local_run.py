"""The local executor: the same smoke run as on SLURM, as 2 CPU processes on this machine.

Each test builds the environment it means (no_sbatch_env, no_slurm_env): what the machine has
installed, or what an earlier test installed, must not change what a test asserts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.artifacts.checkpoints import inspect_run_dir
from pipeline.tracking import find_run
from tests.launch.conftest import rank_results, run_launcher, smoke_args, submitted_job_id


@pytest.mark.timeout(360)
def test_without_slurm_the_smoke_run_completes_locally(tmp_path: Path, synthetic_shards: Path, no_sbatch_env) -> None:
    run_dir = tmp_path / "smoke"
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), "--follow"], env=no_sbatch_env, timeout=350)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # No --local: the launcher found no SLURM and said so.
    assert "executor: local (no SLURM cluster here (sbatch is not on PATH): running locally" in out.stdout
    job_id = submitted_job_id(out.stdout)
    assert f"[launch] job {job_id} ended: COMPLETED" in out.stdout
    # --follow ends with the run's summary: where it got, its export, its MLflow run, what it took.
    assert "[launch] reached step 30/30, last train loss " in out.stdout
    assert f"[launch] export: {run_dir / 'export'}" in out.stdout
    assert re.search(r"^\[launch\] eval top-1: final \d\.\d{4}, best \d\.\d{4}$", out.stdout, re.M), out.stdout
    assert re.search(r"^\[launch\] took (\d+m\d\ds|\d+s) over 1 attempt\(s\), 0 requeue\(s\)$", out.stdout, re.M)

    # Both ranks trained every step; one sharded checkpoint written by 2 ranks.
    results = rank_results(run_dir, job_id, ranks=2)
    assert [(outcome, r.status, r.step) for outcome, r in results] == [("success", "completed", 30)] * 2
    info = inspect_run_dir(run_dir)
    assert info is not None and (info.step, info.world_size) == (30, 2)
    assert results[0][1].metrics["train/loss"] < 1.3  # 4 classes: ln 4 = 1.39 at chance

    run = find_run(run_dir)  # the MLflow run the engine opened, via the run dir's tracking.json
    assert run.status == "FINISHED" and run.run_id == results[0][1].run_id
    assert run.tags["world_size"] == "2"

    job = json.loads((run_dir / "job.json").read_text())
    assert [j["job_id"] for j in job["jobs"]] == [job_id] and job["requeues"] == 0
    assert [(a["restart"], a["result"], a["step"]) for a in job["attempts"]] == [(0, "completed", 30)]

    _assert_the_log_starts_with_our_phases_and_no_noise(run_dir / "submitit" / job_id / f"{job_id}_0_log")

    status = run_launcher(["--status", str(run_dir)], env=no_sbatch_env)
    assert status.returncode == 0
    assert f"job {job_id} (local, 2 node(s) x 1 tasks): COMPLETED" in status.stdout
    assert "last checkpoint: step 30 (step_00000030, saved by 2 ranks)" in status.stdout
    assert f"MLflow run id: {run.run_id}" in status.stdout
    assert "progress: step 30/30, loss " in status.stdout and "all steps done" in status.stdout
    assert f"rank 0 log: {run_dir / 'submitit' / job_id / f'{job_id}_0_log.out'}" in status.stdout


# Third-party start-up noise the ranks keep out of the job's log (pipeline/logs.py).
NOISE = ("compilers.C.base", "gcc ", "No CUDA runtime is found", "FutureWarning", "Setting accelerator to CPU")


def _assert_the_log_starts_with_our_phases_and_no_noise(log: Path) -> None:
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    lines = [line for line in out.splitlines() if not line.startswith("submitit ")]
    # Our first line comes before torch and DeepSpeed load, seconds after the rank starts.
    assert re.search(r"\[rank 0\] pipeline\.startup: start-up: rank 0 of 2, job \d+ \(restart 0\)", lines[0]), out
    started = re.search(r"^submitit INFO \(\S+ (\d+):(\d+):(\d+),\d+\) - Starting", out, re.M)
    first = re.match(r"(\d+):(\d+):(\d+) ", lines[0])
    assert started and first, out
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (started.groups(), first.groups())]
    assert 0 <= (seconds[1] - seconds[0]) % 86400 <= 10, out
    phases = re.findall(r"pipeline\.startup: start-up: (.+?) in \d+\.\d s", out)
    said = [p for p in phases if p in ("environment", "data index", "model", "engine", "resume", "tracker")]
    assert said == ["environment", "data index", "model", "engine", "resume", "tracker"], out
    assert out.index("start-up: tracker in") < out.index("start-up: ready in") < out.index("training smoke")
    assert [n for n in NOISE if n in out or n in err] == [], out + err


@pytest.mark.timeout(60)
def test_slurm_installed_but_not_answering_falls_back_to_local(
    tmp_path: Path, synthetic_shards: Path, no_slurm_env
) -> None:
    # SLURM's tools may be on PATH (`make system-deps` installs them), but no controller answers at
    # SLURM_CONF: the launcher must ask the controller, not trust the binaries, and say which it saw.
    out = run_launcher([*smoke_args(synthetic_shards, tmp_path / "run"), "--dry-run"], env=no_slurm_env)
    assert out.returncode == 0, out.stdout + out.stderr
    if shutil.which("sbatch", path=no_slurm_env["PATH"]):
        # Debian's sinfo retries a missing config for 60 s: the probe's timeout answers first.
        said = re.search(
            r"^executor: local \(no SLURM cluster here \(sinfo (failed: |did not answer within 5 s)", out.stdout, re.M
        )
        assert said, out.stdout
    else:
        assert "executor: local (no SLURM cluster here (sbatch is not on PATH): running locally" in out.stdout
    assert "local executor: 2 processes on this machine" in out.stdout
