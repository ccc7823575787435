"""The launcher against a real 2-node SLURM cluster on 127.0.0.1 (tests/slurm/start_local_slurm.sh).

The smoke run trains one rank per node; the timeout test gives the job a 1-minute limit so SLURM's
USR2 arrives mid-training: all ranks save, submitit requeues, and the job resumes from that very
checkpoint in the same MLflow run until it finishes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch import executor
from launch.cluster import FINAL_STATES, job_state
from pipeline.artifacts.checkpoints import inspect_run_dir
from pipeline.tracking import find_run, metric_history
from pipeline.train.saving import SAVE_PAUSE_ENV
from tests.launch.conftest import rank_results, run_launcher, smoke_args, submitted_job_id

pytestmark = pytest.mark.slurm


def _log(run_dir: Path, job_id: str, rank: int) -> str:
    """A rank's stdout and stderr, as submitit's srun wrote them (all attempts of the job)."""
    folder = run_dir / "submitit" / job_id
    files = [folder / f"{job_id}_{rank}_log.{ext}" for ext in ("out", "err")]
    return "".join(f.read_text() for f in files if f.exists())  # nothing yet while the job is pending


@dataclass
class Finished:
    run_dir: Path
    job_id: str
    stdout: str


@pytest.fixture(scope="module")
def smoke_on_slurm(slurm_env, synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    run_dir = tmp_path_factory.mktemp("slurm") / "smoke"
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), "--follow"], env=slurm_env, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Finished(run_dir, submitted_job_id(out.stdout), out.stdout)


@pytest.mark.timeout(300)
def test_smoke_trains_one_rank_per_node(smoke_on_slurm: Finished, slurm_env) -> None:
    run_dir, job_id = smoke_on_slurm.run_dir, smoke_on_slurm.job_id
    assert "executor: slurm (sinfo answered" in smoke_on_slurm.stdout
    assert f"[launch] job {job_id} ended: COMPLETED" in smoke_on_slurm.stdout
    script = (run_dir / "submitit" / job_id / f"{job_id}_submission.sh").read_text()  # what sbatch got
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=USR2@120"]:
        assert line in script
    logs = [_log(run_dir, job_id, rank) for rank in (0, 1)]
    assert "node=0(2), global_rank=0(2)" in logs[0] and "node=1(2), global_rank=1(2)" in logs[1]
    results = rank_results(run_dir, job_id, ranks=2)
    assert [(outcome, r.status, r.step) for outcome, r in results] == [("success", "completed", 30)] * 2
    info = inspect_run_dir(run_dir)
    assert info is not None and (info.step, info.world_size) == (30, 2)
    run = find_run(run_dir)
    assert run.status == "FINISHED" and run.tags["slurm.job_id"] == job_id and run.tags["world_size"] == "2"
    job = json.loads((run_dir / "job.json").read_text())
    assert job["attempts"][0]["hosts"] == ["node1", "node2"] and job["requeues"] == 0
    status = run_launcher(["--status", str(run_dir)], env=slurm_env)
    assert f"job {job_id} (slurm, 2 node(s) x 1 tasks): COMPLETED" in status.stdout  # from sacct
    assert "nodes node1,node2" in status.stdout and f"MLflow run id: {run.run_id}" in status.stdout


@pytest.mark.timeout(120)
def test_bad_partition_or_account_shows_sbatch_error(slurm_env, synthetic_shards: Path, tmp_path: Path) -> None:
    cases = {
        ("--partition", "nosuch"): ("sbatch: error: invalid partition specified: nosuch", "check --partition"),
        ("--account", "nosuch"): ("Invalid account or account/partition combination specified", "check --account"),
    }
    for (flag, value), (error, hint) in cases.items():
        run_dir = tmp_path / value / flag.strip("-")
        out = run_launcher([*smoke_args(synthetic_shards, run_dir), flag, value], env=slurm_env)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "error: slurm refused the job:" in out.stderr and error in out.stderr and f"hint: {hint}" in out.stderr
        assert not (run_dir / "job.json").exists()


@pytest.mark.timeout(420)
def test_timeout_saves_requeues_and_resumes(smoke_on_slurm: Finished, slurm_env, synthetic_shards, tmp_path) -> None:
    # ~50 s of training at the speed the smoke run just measured: longer than the first attempt
    # can run before SLURM's USR2 (limit 60 s - 5 s delay; SLURM may send it up to 60 s early).
    img_per_s = rank_results(smoke_on_slurm.run_dir, smoke_on_slurm.job_id, ranks=1)[0][1].metrics["train/img_per_s"]
    steps = int(min(3000, max(100, 50 * img_per_s / 32))) // 10 * 10  # logged every steps / 10
    run_dir = tmp_path / "requeue"
    extra = ["--time", "1", "launch.signal_delay_s=5", "launch.max_timeouts=10", f"train.steps={steps}",
             f"train.log_every={steps // 10}", "checkpoint.every_steps=0"]  # fmt: skip
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), "--follow", *extra], env=slurm_env, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = submitted_job_id(out.stdout)

    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert len(attempts) >= 2, attempts  # at least one requeue
    assert [a["restart"] for a in attempts] == list(range(len(attempts)))
    assert [a["result"] for a in attempts] == ["preempted"] * (len(attempts) - 1) + ["completed"]
    # SLURM may send USR2 up to a minute early: an attempt still starting up requeues without a save.
    early = [a for a in attempts[:-1] if "step" not in a]
    assert all(a["error"] == executor.EARLY_USR2 for a in early), early
    saved = [a["step"] for a in attempts[:-1] if "step" in a]
    assert saved and saved == sorted(saved) and attempts[-1]["step"] == steps
    log = _log(run_dir, job_id, 0)
    for step in saved:  # each attempt resumed exactly where the previous one saved on USR2
        assert f"saved step {step} on the pre-timeout signal" in log
        assert f"resumed from {run_dir}/checkpoints/step_{step:08d} (step {step}," in log

    run = find_run(run_dir)
    assert {a["mlflow_run_id"] for a in attempts if "step" in a} == {run.run_id}  # one run across the requeues
    assert run.status == "FINISHED" and run.tags["slurm.restart_count"] == str(len(attempts) - 1)
    logged = [step for step, _ in metric_history(run.tracking_uri, run.run_id, "train/loss")]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # the step count continues, no repeats


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(1)


@pytest.mark.timeout(420)
def test_preemption_requeues_without_using_up_timeouts(
    slurm_env, synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # launch.max_timeouts=0: a timeout would end the job; a preemption must still requeue it.
    run_dir = tmp_path / "preempt"
    extra = ["--time", "30", "launch.max_timeouts=0", "train.steps=60", "train.log_every=10"]
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), *extra], env=slurm_env)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = submitted_job_id(out.stdout)
    ft_dir, ft_id = _finetune_after(run_dir, job_id, synthetic_shards, tmp_path, slurm_env)
    _wait_for(lambda: "step 10/60" in _log(run_dir, job_id, 0), 180, "the first training steps")
    # A preemption as submitit simulates it (Job._interrupt): SIGTERM to every process of the job,
    # which submitit ignores in the rank and our DataLoader workers survive, then USR2 long before
    # the time limit, which submitit counts as a preemption, not a timeout.
    subprocess.run(["scancel", job_id, "--signal=TERM"], env=slurm_env, check=True, timeout=30)
    time.sleep(1)
    subprocess.run(["scancel", job_id, "--signal=USR2"], env=slurm_env, check=True, timeout=30)
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])  # for squeue/sacct in job_state
    _wait_for(lambda: job_state(job_id) in FINAL_STATES, 240, "the job to end")
    assert job_state(job_id) == "COMPLETED"
    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert [a["result"] for a in attempts] == ["preempted", "completed"] and attempts[-1]["step"] == 60
    log = _log(run_dir, job_id, 0)
    assert "this job is preempted" in log and "Requeued job" in log and "(0 remaining timeouts)" in log
    assert f"resumed from {run_dir}/checkpoints/step_{attempts[0]['step']:08d}" in log
    # The run dir's lease: the launcher's, adopted by both attempts (kept across the requeue), then released.
    assert log.count("adopted the lease taken by the launcher") == 2
    assert "keeping the lease of" in log and not (run_dir / "lease.json").exists()
    _finetune_ran_after(ft_dir, ft_id, run_dir, job_id, slurm_env, final_step=60)


def _finetune_after(pre: Path, pre_id: str, shards: Path, tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """Queue a fine-tune of ``pre`` right behind it (--after): SLURM holds it (reason Dependency)."""
    ft_dir = tmp_path / "finetune"
    extra = [f"finetune.init_from={pre}", "finetune.num_classes=4", "train.steps=5", "--after", str(pre)]
    out = run_launcher([*smoke_args(shards, ft_dir), *extra], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"after: job {pre_id} (run dir {pre}) is " in out.stdout
    assert f"; queued with --dependency=afterok:{pre_id} --kill-on-invalid-dep=yes (starts when it" in out.stdout
    ft_id = submitted_job_id(out.stdout)
    reason = subprocess.run(["squeue", "-h", "-j", ft_id, "-o", "%T %r"], env=env, capture_output=True, text=True)
    assert reason.stdout.split() == ["PENDING", "Dependency"], reason
    return ft_dir, ft_id


def _finetune_ran_after(ft_dir: Path, ft_id: str, pre: Path, pre_id: str, env: dict[str, str], final_step: int) -> None:
    """The fine-tune started only after the pretrain's end (its requeues included) and loaded its final checkpoint."""
    _wait_for(lambda: job_state(ft_id) in FINAL_STATES, 240, "the fine-tune to end")
    assert job_state(ft_id) == "COMPLETED"
    sacct = ["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", f"{pre_id},{ft_id}"]
    times = {j: (start, end) for j, start, end in (line.split("|") for line in _stdout(sacct, env).splitlines())}
    assert times[ft_id][0] >= times[pre_id][1], times  # ISO times: the fine-tune started at or after the end
    step_dir = pre / "checkpoints" / f"step_{final_step:08d}"
    assert f"fine-tune init from {step_dir} (checkpoint): " in _log(ft_dir, ft_id, 0)
    status = run_launcher(["--status", str(ft_dir)], env=env)
    assert f"job {ft_id} (slurm, 2 node(s) x 1 tasks): COMPLETED" in status.stdout
    assert f"    after job {pre_id} (run dir {pre}): COMPLETED\n" in status.stdout


def _stdout(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=30).stdout


@contextlib.contextmanager
def _cancelled_at_end(job_id: str, env: dict[str, str]) -> Iterator[None]:
    """A test that fails half-way must not leave its job holding both nodes for the next test."""
    try:
        yield
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """<run_dir>/metrics.jsonl by step: train and eval records of one step merged (newer keys win)."""
    by_step: dict[int, dict[str, float]] = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        by_step.setdefault(rec["step"], {}).update(rec)
    return by_step


@pytest.mark.timeout(480)
def test_usr2_to_the_batch_shell_requeues_and_continues_exactly(
    smoke_on_slurm: Finished, slurm_env, synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `scancel -b --signal=USR2` reaches only the batch shell; its srun wrapper forwards it to the
    # ranks. The last rank pauses 8 s inside the step-10 save, so the signal lands mid-run.
    run_dir = tmp_path / "batch-usr2"
    env = {**slurm_env, SAVE_PAUSE_ENV: "8@10"}
    out = run_launcher(smoke_args(synthetic_shards, run_dir), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = submitted_job_id(out.stdout)
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    with _cancelled_at_end(job_id, slurm_env):
        _wait_for(lambda: "step 10/30" in _log(run_dir, job_id, 0), 240, "step 10")
        subprocess.run(["scancel", "-b", "--signal=USR2", job_id], env=slurm_env, check=True, timeout=30)
        _wait_for(lambda: job_state(job_id) in FINAL_STATES, 360, "the job to end")
    assert job_state(job_id) == "COMPLETED"
    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert [a["result"] for a in attempts] == ["preempted", "completed"], attempts
    saved = attempts[0]["step"]
    assert 10 < saved < 30 and attempts[1]["step"] == 30
    log = _log(run_dir, job_id, 0)
    assert f"saved step {saved} on the pre-timeout signal" in log
    assert f"resumed from {run_dir}/checkpoints/step_{saved:08d} (step {saved}," in log
    # Exact continuation: every logged window that lies wholly in one attempt, and the final
    # evaluation, equal the uninterrupted run's (the window around the restart spans both).
    ours, reference = _metrics(run_dir), _metrics(smoke_on_slurm.run_dir)
    whole = [s for s in range(5, 31, 5) if s <= saved or s - 5 >= saved]
    assert [ours[s]["train/loss"] for s in whole] == [reference[s]["train/loss"] for s in whole]
    assert [ours[30][k] for k in ("eval/top1", "eval/loss")] == [reference[30][k] for k in ("eval/top1", "eval/loss")]


@pytest.mark.timeout(420)
def test_scancel_saves_at_the_stop_step_and_marks_the_attempt(
    slurm_env, synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain scancel: SIGTERM now, SIGKILL KillWait (5 s here) later. A save takes well under 1 s,
    # so it fits: the ranks save the step they stopped at, the attempt says "cancelled" and the
    # MLflow run ends KILLED.
    run_dir = tmp_path / "cancel"
    extra = ["train.steps=3000", "train.log_every=10", "checkpoint.every_steps=20"]
    out = run_launcher([*smoke_args(synthetic_shards, run_dir), *extra], env=slurm_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on SIGTERM the ranks save if a checkpoint fits in KillWait: 5 s (scontrol show config)" in out.stdout
    job_id = submitted_job_id(out.stdout)
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    with _cancelled_at_end(job_id, slurm_env):
        _wait_for(lambda: "step 30/3000" in _log(run_dir, job_id, 0), 240, "step 30 (after the step-20 save)")
        subprocess.run(["scancel", job_id], env=slurm_env, check=True, timeout=30)
        _wait_for(lambda: job_state(job_id) in FINAL_STATES, 120, "the job to end")
    assert job_state(job_id) == "CANCELLED"
    attempts = json.loads((run_dir / "job.json").read_text())["attempts"]
    assert [a["result"] for a in attempts] == ["cancelled"], attempts
    stopped = attempts[0]["step"]
    assert stopped >= 30
    info = inspect_run_dir(run_dir)
    assert info is not None and info.step == stopped  # a checkpoint at the very step it stopped
    log = _log(run_dir, job_id, 0)
    assert "received SIGTERM: the job is being stopped" in log
    assert f"saved step {stopped} on SIGTERM (a save takes ~" in log and "fits in" in log
    run = find_run(run_dir)
    assert run.status == "KILLED" and attempts[0]["mlflow_run_id"] == run.run_id


@pytest.mark.timeout(480)
def test_two_ranks_per_node_on_two_nodes(slurm_env, synthetic_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "2x2"
    args = [*smoke_args(synthetic_shards, run_dir), "launch.ranks_per_node=2", "train.steps=10",
            "checkpoint.every_steps=0", "--follow"]  # fmt: skip
    out = run_launcher(args, env=slurm_env, timeout=460)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = submitted_job_id(out.stdout)
    script = (run_dir / "submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=2" in script
    for rank in range(4):  # SLURM's task order: ranks 0, 1 on node1, ranks 2, 3 on node2
        node, local = divmod(rank, 2)
        log = _log(run_dir, job_id, rank)
        assert f"local_rank={local}(2), node={node}(2), global_rank={rank}(4)" in log  # submitit's line
        assert f"cpus: rank {rank} (node {node}, local rank {local}/2) may use 1 CPU(s) (" in log
    results = rank_results(run_dir, job_id, ranks=4)
    assert [(outcome, r.status, r.step) for outcome, r in results] == [("success", "completed", 10)] * 4
    # One rendezvous: rank 0's MLflow run id reached both nodes' first ranks (their system-metrics
    # trackers attach to it); local rank 1 keeps no tracker.
    assert [r.run_id is not None for _, r in results] == [True, False, True, False]
    assert len({r.run_id for _, r in results} - {None}) == 1
    # One commit: a single checkpoint, written by 4 ranks, with one marker.
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000010"]
    info = inspect_run_dir(run_dir)
    assert info is not None and (info.step, info.world_size) == (10, 4)
    run = find_run(run_dir)
    assert run.tags["world_size"] == "4" and run.tags["nodes"] == "2" and results[0][1].run_id == run.run_id
