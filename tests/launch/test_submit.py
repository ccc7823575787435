"""The launcher's command line: help, pre-submission refusals, --dry-run, containers, --status.

Nothing here starts a job: every refusal must leave the run dir without job.json or submitit folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launch import submit
from launch.cluster import parse_time_min
from pipeline.config import load_config
from pipeline.tracking.tags import SOURCE_ENV
from tests.launch.conftest import REPO, run_launcher, smoke_args

FLAGS = ["--config", "--nodes", "--gpus-per-node", "--cpus-per-task", "--mem", "--partition", "--account", "--qos",
         "--time", "--constraint", "--exclude", "--job-name", "--run-dir", "--local", "--dry-run", "--wait",
         "--follow", "--container", "--status", "section.key=value"]  # fmt: skip


def _nothing_submitted(run_dir: Path) -> None:
    assert not (run_dir / "job.json").exists()
    assert not (run_dir / "submitit").exists()


@pytest.mark.timeout(30)
def test_help_names_every_flag() -> None:
    out = run_launcher(["--help"])
    assert out.returncode == 0
    for flag in FLAGS:
        assert flag in out.stdout, flag


@pytest.mark.timeout(30)
def test_unknown_config_key_is_refused(tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture) -> None:
    rc = submit.main(smoke_args(synthetic_shards, tmp_path / "run", "--local", "optim.lrr=0.1"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(30)
def test_nvjpeg_on_cpu_ranks_is_refused_before_anything_runs(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = submit.main(smoke_args(synthetic_shards, tmp_path / "run", "--local", "data.decoder=nvjpeg"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "data.decoder=nvjpeg decodes JPEGs on the GPU, and this job's ranks are CPU ranks" in err
    assert "add --gpus-per-node G, or set data.decoder=pil" in err and "nothing was submitted" in err
    _nothing_submitted(tmp_path / "run")
    rc = submit.main(
        smoke_args(synthetic_shards, tmp_path / "run", "--local", "data.decoder=nvjpeg", "train.device=cpu")
    )
    assert rc == 2 and "data.decoder=nvjpeg decodes JPEGs on the GPU, and train.device=cpu" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_too_little_data_for_the_ranks_is_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    # 2 ranks x 16 workers = 32 slots x batch 16 = 512 samples needed; the split has 360.
    rc = submit.main(smoke_args(synthetic_shards, tmp_path / "run", "--local", "data.num_workers=16"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "data preflight for 2 ranks x 16 workers failed" in err
    assert "360 samples" in err and "at least 512" in err
    assert "nothing was submitted" in err
    _nothing_submitted(tmp_path / "run")


@pytest.mark.timeout(60)
def test_unwritable_run_dir_is_refused(tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = submit.main(smoke_args(synthetic_shards, blocker / "run", "--local"))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"run dir {blocker / 'run'} is not writable" in err and "pass --run-dir" in err
    if os.geteuid() != 0:  # root writes anywhere; a read-only directory only stops other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert submit.main(smoke_args(synthetic_shards, ro / "run", "--local")) == 1


@pytest.mark.timeout(60)
def test_no_sbatch_falls_back_to_local_and_says_so(tmp_path: Path, synthetic_shards: Path, no_sbatch_env) -> None:
    out = run_launcher([*smoke_args(synthetic_shards, tmp_path / "run"), "--dry-run"], env=no_sbatch_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "executor: local (no SLURM cluster here (sbatch is not on PATH): running locally on this machine)" in out.stdout
    )
    assert "local executor: 2 processes on this machine" in out.stdout


@pytest.mark.timeout(60)
def test_dry_run_prints_sbatch_script_rendezvous_and_memory_plan(tmp_path: Path, synthetic_shards: Path) -> None:
    import torch  # noqa: F401  (the model's parameter count below is the reference)

    from pipeline.model import ViT

    run_dir = tmp_path / "run"
    placement = ["--partition", "cpu", "--account", "proj", "--qos", "high", "--time", "1:30:00"]
    placement += ["--cpus-per-task", "3", "--mem", "0", "--exclude", "node[3-4]"]
    args = [*smoke_args(synthetic_shards, run_dir, "--local", "--dry-run"), *placement]
    out = run_launcher(args)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=90", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --partition=cpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --cpus-per-task=3", "#SBATCH --mem=0", "#SBATCH --exclude='node[3-4]'",
                 f"#SBATCH --output={run_dir}/submitit/%j/%j_0_log.out", "srun --unbuffered",
                 f"-m submitit.core._submit {run_dir}/submitit/%j"]:  # fmt: skip
        assert line in text, line
    assert "rendezvous: 2 ranks = 2 node(s) x 1 task(s), backend gloo (CPU)" in text
    # CPUs per rank: the rule, this machine's figures (--local: both ranks here), the srun binding.
    assert "cpus per rank: torch threads = CPUs - 1 loader worker(s), at least 1" in text
    here = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"  here: {here} CPU(s) per rank ({len(os.sched_getaffinity(0))} usable CPUs / 2 local rank(s))" in text
    assert "SLURM_CPUS_ON_NODE / tasks per node: 3 (--cpus-per-task)" in text
    assert "srun --unbuffered --output" in text and "--cpu-bind=cores" in text
    assert "data CPU budget: CPU ranks (no GPU to keep fed); not planned" in text
    cfg = load_config(REPO / "configs/smoke.yaml", ["model.num_classes=4"])
    n_params = sum(p.numel() for p in ViT(**cfg.model.vit_kwargs()).parameters())
    assert f"memory plan per rank (CPU ranks: no GPU memory involved): ViT with {n_params:,} parameters" in text
    assert "activations per micro batch of 16 images (65 tokens" in text
    assert "ok: data:" in text and "dry run: nothing submitted" in text
    _nothing_submitted(run_dir)


@pytest.mark.timeout(60)
def test_dry_run_with_container_shows_the_apptainer_command(tmp_path: Path, synthetic_shards: Path) -> None:
    image = tmp_path / "train.sif"
    image.write_bytes(b"not really an image: the dry run only needs the file")
    run_dir = tmp_path / "run"
    args = [*smoke_args(synthetic_shards, run_dir, "--dry-run", "--local"), "--container", str(image),
            "--gpus-per-node", "2", "launch.gpu_mem_gb=80"]  # fmt: skip
    out = run_launcher(args)
    wrapped = (
        f"apptainer exec --nv --bind {run_dir},{synthetic_shards}:{synthetic_shards}:ro,{REPO}:{REPO}:ro "
        f"--env PYTHONPATH={REPO} {image} python3 -u -m submitit.core._submit {run_dir}/submitit/%j"
    )
    assert wrapped in out.stdout  # the rank command, and inside the sbatch script's srun line
    assert out.stdout.count(f"{image} python3 -u -m submitit.core._submit") == 2
    assert "#SBATCH --gpus-per-node=2" in out.stdout and "memory plan per GPU" in out.stdout
    assert "of 80.00 GiB" in out.stdout
    # This machine has neither apptainer nor GPUs: a real local submission would be refused.
    assert out.returncode == 1 and "REFUSED:" in out.stdout
    _nothing_submitted(run_dir)
    missing = run_launcher([*smoke_args(synthetic_shards, run_dir, "--local"), "--container", str(tmp_path / "x.sif")])
    assert missing.returncode == 1
    assert f"launch.container: {tmp_path / 'x.sif'} does not exist" in missing.stderr


def test_status_of_a_dir_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert submit.main(["--status", str(tmp_path)]) == 1
    assert f"{tmp_path / 'job.json'} does not exist" in capsys.readouterr().err


def test_time_formats() -> None:
    assert [parse_time_min(t) for t in ["90", "1:30:00", "2-00:00:00", "1-12", "0:59:30", "1-01:30"]] == [
        90, 90, 2880, 2160, 60, 1530,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="is not a SLURM time"):
        parse_time_min("ninety")


def _fake_checkpoint(run_dir: Path, step: int, model: dict | None, complete: bool = True) -> None:
    from pipeline.artifacts.checkpoints import tag_for
    from pipeline.train.checkpoint import commit

    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 8)
    if complete:
        commit(tag_dir, {"step": step, "samples_seen": 32 * step, "world_size": 2, "zero_stage": 2, "model": model})


@pytest.mark.timeout(60)
def test_run_dir_with_only_partial_checkpoints_is_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, 10, None, complete=False)
    assert submit.main(smoke_args(synthetic_shards, run_dir, "--local")) == 1
    err = capsys.readouterr().err
    assert "holds 1 checkpoint(s)" in err and "none is complete" in err and "Refusing to start fresh" in err
    _nothing_submitted(run_dir)
    # The Source tag meant for the job must not outlive main(): a later in-process job would report it as its own.
    assert SOURCE_ENV not in os.environ


@pytest.mark.timeout(60)
def test_checkpoint_of_another_model_is_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipeline.config import config_to_dict

    run_dir = tmp_path / "run"
    other = load_config(REPO / "configs" / "smoke.yaml", ["model.dim=96", "model.num_classes=4"]).model
    _fake_checkpoint(run_dir, 10, config_to_dict(other))
    assert submit.main(smoke_args(synthetic_shards, run_dir, "--local")) == 1
    err = capsys.readouterr().err
    assert "was written for another model: model.dim: checkpoint 96 vs config 48" in err
    _nothing_submitted(run_dir)


@pytest.mark.timeout(60)
def test_preflight_skips_a_checkpoint_with_a_garbage_trainer_state(tmp_path: Path, synthetic_shards: Path) -> None:
    from pipeline.artifacts.checkpoints import checksum_files, tag_for
    from pipeline.config import config_to_dict
    from pipeline.train.checkpoint import commit

    run_dir = tmp_path / "run"
    model = config_to_dict(load_config(REPO / "configs/smoke.yaml", ["model.num_classes=4"]).model)
    for step in (30, 40):  # as a 2-rank ZeRO-2 save leaves them, with the checksums of their writers
        tag_dir = run_dir / "checkpoints" / tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
        (tag_dir / "trainer_state.json").write_text(f'{{"step": {step}, "samples_seen": {32 * step}}}')
        info = {"step": step, "samples_seen": 32 * step, "world_size": 2, "zero_stage": 2, "model": model}
        commit(tag_dir, info, [checksum_files(tag_dir, list(tag_dir.iterdir()))])
    state = run_dir / "checkpoints" / tag_for(40) / "trainer_state.json"
    state.write_bytes(b"\x00" * state.stat().st_size)  # same size, garbage
    out = run_launcher(smoke_args(synthetic_shards, run_dir, "--dry-run", "--local"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "ok: checkpoint: resumes from step 30 (step_00000030, saved by 2 ranks); skipped damaged step_00000040: "
        f"{state} does not match its checksum" in out.stdout
    )
    state.write_bytes(b"\x00" * 3)  # and once the older one is damaged too: refused, never a fresh start
    (run_dir / "checkpoints" / tag_for(30) / "trainer_state.json").write_text('{"step": 30, "samples_seen": 961}')
    out = run_launcher(smoke_args(synthetic_shards, run_dir, "--dry-run", "--local"))
    assert out.returncode == 1
    assert "REFUSED: " in out.stdout and "but none is complete and intact" in out.stdout
    assert f"{state} is missing or has the wrong size (3 bytes, committed" in out.stdout
    assert f"{run_dir / 'checkpoints' / tag_for(30) / 'trainer_state.json'} does not match its checksum" in out.stdout


@pytest.mark.timeout(120)
def test_two_submits_of_another_recipe_get_two_run_dirs_and_a_changed_recipe_is_refused(
    tmp_path: Path, synthetic_shards: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default run dirs land under ./runs
    common = ["--config", str(REPO / "configs" / "smoke.yaml"), "--nodes", "2", "--local", "--dry-run",
              f"data.path={synthetic_shards}", "model.num_classes=4", "launch.ranks_per_node=1"]  # fmt: skip
    dirs = []
    for lr in ("1e-3", "3e-4"):
        assert submit.main([*common, f"optim.lr={lr}"]) == 0
        out = capsys.readouterr().out
        run_dir = tmp_path / "runs" / f"smoke-data_{synthetic_shards.name}-num_classes4-lr{lr}"
        assert f"== run dir: {run_dir} (the default: runs/<config name>-<recipe overrides>;" in out
        assert "ok: checkpoint: none in the run dir, the job starts fresh" in out
        dirs.append(run_dir)
    assert dirs[0] != dirs[1]

    # A run ran in the first dir (its config.yaml); the same command resumes it, another recipe is refused.
    from pipeline.config import save_config

    save_config(submit.resolve_config(submit.build_parser().parse_intermixed_args([*common, "optim.lr=1e-3"])),
                dirs[0] / "config.yaml")  # fmt: skip
    assert submit.main([*common, "optim.lr=1e-3"]) == 0
    assert "REFUSED" not in capsys.readouterr().out
    changed = [*common, "--run-dir", str(dirs[0]), "optim.lr=3e-4"]
    assert submit.main(changed) == 1
    out = capsys.readouterr().out
    assert f"== run dir: {dirs[0]} (set by --run-dir or train.run_dir)" in out
    assert (
        f"REFUSED: run dir {dirs[0]} holds a run of another recipe: resuming would change the run's recipe: optim.lr: "
        "saved 0.001, now 0.0003. A resumed run keeps the model, optimizer, data and augmentation of its checkpoint; "
        "set them back (optim.lr=0.001) to resume it, or pass another train.run_dir" in out
    )
    assert "--allow-recipe-change" in out
    assert submit.main([*changed, "--allow-recipe-change"]) == 0
    out = capsys.readouterr().out
    assert "recipe: optim.lr: 0.001 -> 0.0003 (recipe changed on purpose (checkpoint.allow_recipe_change)" in out


def test_sacct_records_of_array_tasks_that_never_started_stand_for_each_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SLURM keeps one accounting record for the pending tasks of an array (e.g. cancelled on a failed
    # dependency before any started): "82_[0-3%2]". Each task's state is that record's.
    from launch import cluster

    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    records = ["82_[1-3%%2]|CANCELLED by 0|0:0|00:00:00|None assigned", "82_0|COMPLETED|0:0|00:00:09|node1",
               "90_[0,2]|PENDING|0:0|00:00:00|None assigned"]  # fmt: skip
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nprintf \'' + "\\n".join(records) + "\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    got = cluster.sacct_jobs(["82_0", "82_1", "82_3", "82_4", "90_2", "90_1"])
    assert {k: v.state for k, v in got.items()} == {
        "82_0": "COMPLETED", "82_1": "CANCELLED", "82_3": "CANCELLED", "90_2": "PENDING"
    }  # fmt: skip
    # `sacct -j 82_1` leaves out a task that never started: the array ids are asked for too.
    assert (tmp_path / "args").read_text().split()[-1] == "82_0,82_1,82_3,82_4,90_2,90_1,82,90"
