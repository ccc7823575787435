"""The sbatch script's signal forwarding, and its one dependency on submitit's script layout."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.executor import FORWARD_SIGNALS, LaunchPlan, sbatch_script
from pipeline.config import LaunchConfig


def test_the_forwarding_function_precedes_submitits_srun_line(tmp_path: Path) -> None:
    # submitit 1.5.4 writes the `setup` lines, then one `srun ... python -m submitit.core._submit`
    # line. If a submitit release moves or renames that line, the function no longer shadows it and
    # `scancel -b --signal=USR2` would kill the job again: fail here, loudly.
    plan = LaunchPlan("slurm", LaunchConfig(nodes=2, ranks_per_node=1), tmp_path, "t", sys.executable)
    lines = sbatch_script(plan).splitlines()
    start = lines.index(FORWARD_SIGNALS[0])
    assert lines[start : start + len(FORWARD_SIGNALS)] == list(FORWARD_SIGNALS)
    runs = [i for i, line in enumerate(lines) if "submitit.core._submit" in line]
    assert len(runs) == 1 and lines[runs[0]].startswith("srun --unbuffered "), lines
    assert runs[0] > start + len(FORWARD_SIGNALS) and "--cpu-bind=cores" in lines[runs[0]]


def test_a_signal_to_the_batch_shell_reaches_the_step_and_its_exit_code_comes_back(tmp_path: Path) -> None:
    # `srun` here is a stand-in on PATH: a process that records the signals it gets, then exits 7.
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/bash\n"
        f"trap 'echo USR2 >> {tmp_path}/got' USR2\n"
        f"trap 'echo TERM >> {tmp_path}/got; exit 7' TERM\n"
        f"touch {tmp_path}/ready\n"
        "while :; do sleep 0.05; done\n"
    )
    fake.chmod(0o755)
    script = tmp_path / "batch.sh"
    script.write_text("\n".join(["#!/bin/bash", *FORWARD_SIGNALS, "srun --unbuffered x", "echo after=$?", ""]))
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    batch = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and batch.poll() is None
        time.sleep(0.05)
    batch.send_signal(signal.SIGUSR2)  # `scancel -b --signal=USR2`: the batch shell alone
    time.sleep(0.3)
    assert batch.poll() is None  # the shell survived it and still waits for the step
    batch.send_signal(signal.SIGTERM)
    out, _ = batch.communicate(timeout=10)
    assert (tmp_path / "got").read_text().split() == ["USR2", "TERM"]
    assert out.strip() == "after=7" and batch.returncode == 0


def test_usr2_during_start_up_is_recorded_as_a_preemption_not_a_failure(tmp_path: Path, monkeypatch) -> None:
    # Before the engine installs its own USR2 handler, submitit's runs: on rank 0 it calls checkpoint(),
    # requeues the job and raises SystemExit(-1) out of wherever the rank was (here: inside run()).
    import types

    import pipeline.train
    from launch import executor, jobfile
    from pipeline.config import load_config

    cfg = load_config(None, [f"train.run_dir={tmp_path}"])
    job = executor.RankJob(cfg)
    env = types.SimpleNamespace(global_rank=0, num_tasks=1, local_rank=0, num_nodes=1, node=0, cluster="local",
                                job_id="42", hostnames=["h"], hostname="h")  # fmt: skip
    monkeypatch.setattr(executor.submitit, "JobEnvironment", lambda: env)
    monkeypatch.setattr(executor, "_REQUEUED_BY_SUBMITIT", False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "PIPELINE_REQUEUE_COUNT", "PIPELINE_LEASE_TOKEN", "PIPELINE_JOB_ID", "PIPELINE_EXECUTOR"):  # fmt: skip
        monkeypatch.setenv(name, "")  # recorded, so the job's own settings are undone after the test
        monkeypatch.delenv(name)

    def usr2_at_start_up(*args, **kwargs):
        job.checkpoint()
        raise SystemExit(-1)

    monkeypatch.setattr(pipeline.train, "run", usr2_at_start_up)
    try:
        job()
    except SystemExit as e:
        assert e.code == -1
    else:
        raise AssertionError("the SystemExit of submitit's requeue must propagate")
    data = jobfile.read_job_file(tmp_path)
    assert [(a["result"], a["error"]) for a in data["attempts"]] == [("preempted", executor.EARLY_USR2)]
    assert not data.get("failures")  # not reported as a rank's failure

    monkeypatch.setattr(executor, "_REQUEUED_BY_SUBMITIT", False)  # a SystemExit without a requeue is a failure
    monkeypatch.setattr(pipeline.train, "run", lambda *a, **k: sys.exit(3))
    try:
        job()
    except SystemExit:
        pass
    data = jobfile.read_job_file(tmp_path)
    assert [a["result"] for a in data["attempts"]] == ["preempted", "failed"] and len(data["failures"]) == 1
