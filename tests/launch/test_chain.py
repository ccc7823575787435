"""Chained stages (`launch/submit.py --after RUN_DIR|JOB_ID`): refusals before anything is queued, the
sbatch dependency, the local executor's wait, --status of a dependent job, and on the real local SLURM
a fine-tune queued right behind its pretrain (which it loads once the pretrain completed) and one
behind a pretrain that fails (SLURM cancels it; it never runs, and --status says why)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch import chain, checks, cluster, jobfile, status, submit, sweep
from launch.executor import LaunchPlan, sbatch_script
from pipeline.config import LaunchConfig
from pipeline.train.loop import DATA_ERROR_ENV
from pipeline.train.saving import SAVE_PAUSE_ENV
from tests.launch.conftest import run_launcher, smoke_args, submitted_job_id

DATA_ERROR = "DataError: shard train-000003.tar is damaged"


def _predecessor(run_dir: Path, job_id: str, *, executor: str = "local", result: str = "", error: str = "") -> Path:
    """A run dir as launch/submit.py and its rank 0 leave it: one job, one attempt (open unless ``result``)."""
    folder = str(run_dir / "submitit" / job_id)
    job = {"job_id": job_id, "executor": executor, "nodes": 2, "tasks_per_node": 1, "folder": folder}
    jobfile.record_submission(run_dir, name="pre", job=job)
    jobfile.record_attempt_start(run_dir, job_id=job_id, restart=0, hosts=["node1", "node2"])
    if error:
        jobfile.record_failure(run_dir, job_id=job_id, restart=0, rank=1, host="node2", error=error)
    if result:
        jobfile.record_attempt_end(run_dir, job_id=job_id, result=result)
    return run_dir


@pytest.fixture
def running_pid() -> Iterator[int]:
    """The pid of a live process: a local job's id is its controller's pid, alive while the job runs."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


def _finetune_args(shards: Path, run_dir: Path, init_from: Path, *extra: str) -> list[str]:
    return smoke_args(shards, run_dir, f"finetune.init_from={init_from}", "finetune.num_classes=4", *extra)


@pytest.mark.timeout(60)
def test_bad_after_is_refused_before_anything_is_queued(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    failed_id = _dead_pid()
    failed = _predecessor(tmp_path / "failed", failed_id, result="failed", error=DATA_ERROR)
    cases = {
        str(bare): f"--after {bare}: no job.json with a job in it, so it is not a run dir launched by launch/submit.py",
        "no-such-dir": "--after 'no-such-dir' is neither a run dir nor a SLURM job id; pass one of them",
        "4242": "--after 4242: the local executor follows a job through its run dir, not a job id; pass --after",
        str(failed): f"--after {failed}: job {failed_id} (run dir {failed}) already ended FAILED (rank 1 on node2 at ",
    }
    for after, message in cases.items():
        run_dir = tmp_path / "ft"
        rc = submit.main([*smoke_args(synthetic_shards, run_dir, "--local"), "--after", after])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert message in err and "nothing was submitted" in err, err
        assert not run_dir.exists()  # refused before the lease: nothing written
    assert f": {DATA_ERROR}); this job would never start. Rerun the predecessor first, or drop --after" in err


def test_a_slurm_job_cannot_wait_for_a_local_one_and_an_unknown_job_id_is_refused(
    tmp_path: Path, running_pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _predecessor(tmp_path / "pre", str(running_pid))
    with pytest.raises(checks.Refused, match=r"runs on the local executor; a SLURM job cannot wait for it\. Submit"):
        chain.resolve(str(local), "slurm")
    monkeypatch.setattr(cluster, "job_state", lambda job_id: "UNKNOWN")
    with pytest.raises(checks.Refused, match=r"--after 77: SLURM knows no job 77 \(neither squeue nor sacct\)"):
        chain.resolve("77", "slurm")
    monkeypatch.setattr(cluster, "job_state", lambda job_id: "RUNNING")
    pred = chain.resolve("77", "slurm")
    assert (pred.job_id, pred.run_dir, chain.sbatch_dependency(pred)) == ("77", None, "afterok:77")
    assert chain.sbatch_dependency(chain.Predecessor("77", "slurm", None, "COMPLETED")) == ""


def test_the_sbatch_script_carries_the_dependency_and_kills_on_an_invalid_one(tmp_path: Path) -> None:
    plan = LaunchPlan("slurm", LaunchConfig(nodes=2, ranks_per_node=1), tmp_path, "t", sys.executable)
    assert "--dependency" not in sbatch_script(plan)
    lines = sbatch_script(LaunchPlan(**{**plan.__dict__, "after": "afterok:42"})).splitlines()
    assert "#SBATCH --dependency=afterok:42" in lines and "#SBATCH --kill-on-invalid-dep=yes" in lines


@pytest.mark.timeout(120)
def test_init_from_a_run_still_training_needs_after(
    tmp_path: Path, synthetic_shards: Path, running_pid: int, capsys: pytest.CaptureFixture
) -> None:
    pre = _predecessor(tmp_path / "pre", str(running_pid))
    run_dir = tmp_path / "ft"
    rc = submit.main([*_finetune_args(synthetic_shards, run_dir, pre, "--local"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 1
    assert (
        f"REFUSED: finetune.init_from={pre} is a run dir still training (job {running_pid} RUNNING): its newest "
        f"checkpoint is not its final one. Add --after {pre} to start when it completes, or point "
        f"finetune.init_from at one of its checkpoints ({pre}/checkpoints/step_*)"
    ) in out
    # With --after: accepted; the backbone is checked against what the pretrain recorded (its config.yaml).
    (pre / "config.yaml").write_text("model:\n  dim: 48\n  depth: 2\n  heads: 3\n")
    rc = submit.main([*_finetune_args(synthetic_shards, run_dir, pre, "--local", "--dry-run"), "--after", str(pre)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"after: job {running_pid} (run dir {pre}) is RUNNING; this launcher waits here until it ends" in out
    assert (
        f"ok: finetune: init from {pre}, same backbone architecture as model.* (its config.yaml); its final "
        f"checkpoint is loaded when job {running_pid} (run dir {pre}) completes"
    ) in out
    (pre / "config.yaml").write_text("model:\n  dim: 64\n  depth: 2\n")
    rc = submit.main([*_finetune_args(synthetic_shards, run_dir, pre, "--local", "--dry-run"), "--after", str(pre)])
    assert rc == 1 and "model.dim: pretrained 64 vs config 48." in capsys.readouterr().out
    # --after another run: the fine-tune could start before its init_from ends.
    other = _predecessor(tmp_path / "other", str(running_pid))
    rc = submit.main([*_finetune_args(synthetic_shards, run_dir, pre, "--local", "--dry-run"), "--after", str(other)])
    assert rc == 1 and f"REFUSED: finetune.init_from={pre} is a run dir still training" in capsys.readouterr().out


def _end_later(
    run_dir: Path, pid_proc: subprocess.Popen, result: str, error: str = "", *, seen: list[str], dependent: Path
) -> threading.Thread:
    """In a second, the predecessor's rank 0 records ``result`` and its controller exits; just before,
    ``seen`` gets the dependent's --status."""

    def end() -> None:
        time.sleep(1.0)
        seen.append(status.summarise(dependent))
        job_id = str(pid_proc.pid)
        if error:
            jobfile.record_failure(run_dir, job_id=job_id, restart=0, rank=1, host="node2", error=error)
        jobfile.record_attempt_end(run_dir, job_id=job_id, result=result)
        pid_proc.kill()
        pid_proc.wait()

    thread = threading.Thread(target=end)
    thread.start()
    return thread


@pytest.mark.timeout(120)
@pytest.mark.parametrize("result", ["failed", "completed"])
def test_local_executor_waits_for_the_predecessor(
    result: str, tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.setattr(chain, "POLL_S", 0.2)
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    pre = _predecessor(tmp_path / "pre", str(controller.pid))
    (pre / "config.yaml").write_text("model:\n  dim: 48\n")
    run_dir, seen = tmp_path / "ft", []
    thread = _end_later(pre, controller, result, DATA_ERROR if result == "failed" else "", seen=seen, dependent=run_dir)
    start = time.monotonic()
    rc = submit.main([*_finetune_args(synthetic_shards, run_dir, pre, "--local"), "--after", str(pre)])
    waited, captured = time.monotonic() - start, capsys.readouterr()
    thread.join()
    assert rc == 1 and waited >= 1.0, captured.out + captured.err
    assert f"after: job {controller.pid} (run dir {pre}) is RUNNING; this launcher waits here until it ends" in (
        captured.out
    )
    assert seen[0].startswith(f"run {run_dir}: nothing submitted yet: the launcher (pid {os.getpid()}, since ")
    assert seen[0].endswith(
        f") is waiting for job {controller.pid} (run dir {pre}) to complete (afterok); it is RUNNING"
    )
    if result == "failed":
        why = (
            f"job {controller.pid} (run dir {pre}) ended FAILED (rank 1 on node2 at "
            f"{jobfile.read_job_file(pre)['failures'][0]['at']}: {DATA_ERROR}), not COMPLETED (afterok)"
        )
        assert f"error: {why}\nnothing was submitted" in captured.err
        assert status.summarise(run_dir) == f"run {run_dir}: nothing submitted: {why}"
    else:  # it completed, but left no checkpoint: the check that had to wait for its end refuses now
        assert f"after: job {controller.pid} (run dir {pre}) is COMPLETED" in captured.out
        assert f"error: finetune.init_from: {pre} holds no checkpoints" in captured.err
    assert not (run_dir / "submitit").exists() and not (run_dir / "lease.json").exists()
    assert not jobfile.read_job_file(run_dir).get("jobs")


def test_status_of_a_dependent_job_says_what_it_waits_for_and_why_it_never_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = {"11": "RUNNING", "12": "PENDING"}
    monkeypatch.setattr(cluster, "squeue_state", lambda job_id: live.get(job_id))
    monkeypatch.setattr(cluster, "sacct_jobs", lambda ids: {})
    monkeypatch.setattr(status, "reconcile", lambda run_dir, data, states: [])
    pre = _predecessor(tmp_path / "pre", "11", executor="slurm")
    ft = tmp_path / "ft"
    after = chain.Predecessor("11", "slurm", pre, "RUNNING").record()
    job = {"job_id": "12", "executor": "slurm", "nodes": 2, "tasks_per_node": 1, "folder": "f", "after": after}
    jobfile.record_submission(ft, name="ft", job=job)
    assert "    waiting for job 11 (run dir " + f"{pre}) to complete (afterok); it is RUNNING" in status.summarise(ft)
    # The pretrain fails; SLURM cancels the fine-tune (--kill-on-invalid-dep=yes) before it ever started.
    jobfile.record_failure(pre, job_id="11", restart=0, rank=1, host="node2", error=DATA_ERROR)
    jobfile.record_attempt_end(pre, job_id="11", result="failed")
    live.update({"11": "FAILED", "12": "CANCELLED"})
    text = status.summarise(ft)
    at = jobfile.read_job_file(pre)["failures"][0]["at"]
    assert "  job 12 (slurm, 2 node(s) x 1 tasks): CANCELLED; submitted " in text and "; attempts 0" in text
    assert f"    after job 11 (run dir {pre}): FAILED (rank 1 on node2 at {at}: {DATA_ERROR})" in text
    assert "    never ran: job 11 (run dir " + f"{pre}) did not complete, so SLURM cancelled this job (afterok)" in text


@pytest.mark.timeout(30)
def test_help_names_after() -> None:
    out = run_launcher(["--help"])
    assert out.returncode == 0 and "--after RUN_DIR|JOB_ID" in out.stdout


def _wait_until_final(job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := cluster.job_state(job_id)) not in cluster.FINAL_STATES:
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout_s:.0f} s"
        time.sleep(1)
    return state


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_finetune_after_a_pretrain_that_fails_never_runs_and_status_says_why(
    slurm_env: dict[str, str], synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pretrain's rank 1 fails before step 3 (a damaged shard, injected), after a step-2 save that
    # pauses 10 s: time to queue the fine-tune right behind it and ask --status while it waits. (The
    # success case rides on test_slurm.py's preemption run, requeue included.)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    env = {**slurm_env, DATA_ERROR_ENV: "1@3", SAVE_PAUSE_ENV: "10@2"}
    out = run_launcher([*smoke_args(synthetic_shards, pre), "train.steps=4", "checkpoint.every_steps=2"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    pre_id = submitted_job_id(out.stdout)
    out = run_launcher([*_finetune_args(synthetic_shards, ft, pre), "--after", str(pre)], env=slurm_env)
    assert out.returncode == 0, out.stdout + out.stderr
    ft_id = submitted_job_id(out.stdout)
    assert f"; its final checkpoint is loaded when job {pre_id} (run dir {pre}) completes\n" in out.stdout
    waiting = run_launcher(["--status", str(ft)], env=slurm_env).stdout
    # A sweep of fine-tunes over the same pretrain: the whole array waits on it (one afterok).
    grid = tmp_path / "grid"
    out = run_launcher([*_finetune_args(synthetic_shards, grid, pre), "--sweep", "optim.lr=1e-3,2e-3", "--after",
                        str(pre)], env=slurm_env)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted slurm job array " in out.stdout
    members = [Path(m["run_dir"]) for m in sweep.read_record(grid)["members"]]
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])  # for squeue/sacct in job_state
    assert _wait_until_final(ft_id, 240) == "CANCELLED"
    for member in members:
        entry = jobfile.read_job_file(member)["jobs"][0]
        assert entry["after"] == {"job_id": pre_id, "executor": "slurm", "type": "afterok", "run_dir": str(pre)}
        assert _wait_until_final(entry["job_id"], 60) == "CANCELLED"
        assert jobfile.read_job_file(member)["attempts"] == []  # never ran
    assert ", 2 members (2 CANCELLED)" in run_launcher(["--status", str(grid)], env=slurm_env).stdout
    assert cluster.job_state(pre_id) == "FAILED"
    assert f"    waiting for job {pre_id} (run dir {pre}) to complete (afterok); it is " in waiting, waiting

    job = jobfile.read_job_file(ft)
    assert job["jobs"][0]["after"] == {"job_id": pre_id, "executor": "slurm", "type": "afterok", "run_dir": str(pre)}
    assert job["attempts"] == [] and not list((ft / "submitit" / ft_id).glob("*_log.out"))  # it never ran
    text = run_launcher(["--status", str(ft)], env=slurm_env).stdout
    failure = jobfile.read_job_file(pre)["attempts"][-1]["failure"]
    assert f"  job {ft_id} (slurm, 2 node(s) x 1 tasks): CANCELLED; submitted " in text and "; attempts 0" in text
    assert f"    after job {pre_id} (run dir {pre}): FAILED (rank 1 on {failure['host']} at {failure['at']}: " in text
    assert "DataError: data: " in text and " read on rank 1 were skipped" in text
    assert (
        f"    never ran: job {pre_id} (run dir {pre}) did not complete, so SLURM cancelled this job (afterok)" in text
    )
