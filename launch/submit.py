"""Start a training run on SLURM (through submitit) or, without a cluster, as local processes.

    python launch/submit.py --config configs/pretrain/vit_b16.yaml --nodes 8 --gpus-per-node 8
    python launch/submit.py --config configs/smoke.yaml --local --follow
    python launch/submit.py --config configs/pretrain/vit_b16.yaml --nodes 8 --gpus-per-node 8 --dry-run
    python launch/submit.py --status runs/vit_b16
    python launch/submit.py --config configs/smoke.yaml --sweep optim.lr=1e-3,2e-3 --sweep train.seed=1,2

Before anything is queued the config is loaded and validated, the data preflight runs for the
requested ranks and workers, and the run dir is checked (writable, resumable, not in use by another
job); any failure exits non-zero with the reason and nothing is submitted. Every rank runs
``pipeline.train.run``; on SLURM's pre-timeout/preemption signal (USR2) all ranks save a checkpoint
and the job requeues itself, resuming from that checkpoint in the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script: make `launch` and `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import chain, checks, cluster, container, jobfile, status, sweep, sweep_table  # noqa: E402
from launch.data_budget import decode_budget  # noqa: E402
from launch.executor import (  # noqa: E402
    SOURCE_ROOT,
    SRUN_CPU_BIND,
    LaunchPlan,
    RankJob,
    SubmissionError,
    python_command,
    sbatch_script,
    submit,
    submitit_folder,
)
from launch.memory_plan import format_plan, memory_plan  # noqa: E402
from pipeline.config import Config, ConfigError, dump_config, load_config  # noqa: E402
from pipeline.config.schema import default_run_dir  # noqa: E402
from pipeline.tracking.server import read_server_url  # noqa: E402
from pipeline.tracking.tags import SOURCE_ENV, source_name  # noqa: E402
from pipeline.train import lease  # noqa: E402

EXAMPLES = """\
examples:
  python launch/submit.py --config configs/pretrain/vit_b16.yaml --nodes 8 --gpus-per-node 8 --partition gpu
  python launch/submit.py --config configs/smoke.yaml --local --follow     # no cluster: local processes
  python launch/submit.py --config configs/smoke.yaml --dry-run optim.lr=1e-3
  python launch/submit.py --status runs/smoke
  python launch/submit.py --config configs/smoke.yaml --sweep optim.lr=1e-3,2e-3 --max-parallel 2   # runs/smoke-sweep

Flags override the config's launch.* keys (and --run-dir train.run_dir); dotted overrides
(section.key=value) override any key. Exit status: 0 submitted (with --follow: COMPLETED),
1 refused before submission or the job did not complete, 2 bad config or arguments, 4 (with
--follow) completed but some metrics never reached the tracking store (kept for replay).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/submit.py",
        description="Submit a ViT pretraining run: SLURM through submitit when a SLURM controller answers, "
        "else local processes (one per rank). Requeues itself on SLURM's timeout/preemption signal.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="YAML", help="YAML config (default: the embedded defaults, the local demo job)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    res = p.add_argument_group("resources (override launch.*)")
    res.add_argument("--nodes", type=int, metavar="N", help="number of nodes (launch.nodes)")
    res.add_argument(
        "--gpus-per-node", type=int, metavar="G", help="GPUs per node = tasks per node; 0 or absent: CPU ranks"
    )
    res.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per task (rank); 0: the scheduler's default")
    res.add_argument("--mem", help="memory per node, e.g. 64G (0: all of it)")
    res.add_argument("--time", metavar="TIME", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (launch.time_min)")
    sched = p.add_argument_group("SLURM placement")
    placement = [
        ("--partition", "NAME", "partition (default: the cluster's default partition)"),
        ("--account", "NAME", "account to charge"),
        ("--qos", "NAME", "quality of service"),
        ("--constraint", "FEATURES", "node features, e.g. h100"),
        ("--exclude", "NODES", "nodes to avoid, e.g. node[3-4]"),
        ("--job-name", "NAME", "job name (default: the config's name)"),
    ]
    for flag, metavar, what in placement:
        sched.add_argument(flag, metavar=metavar, help=what)
    run = p.add_argument_group("run")
    run.add_argument(
        "--run-dir",
        metavar="DIR",
        help="checkpoints, logs, job.json (default: train.run_dir, else "
        "runs/<name>-<recipe overrides>, e.g. runs/vit_b16-lr3e-4)",
    )
    run.add_argument("--container", metavar="IMAGE.sif", help="run each rank inside this Apptainer image")
    run.add_argument("--local", action="store_true", help="run as local processes even where SLURM is available")
    run.add_argument("--dry-run", action="store_true", help="print config, sbatch script, rendezvous and memory "
                     "plan, run the checks; submit nothing")  # fmt: skip
    run.add_argument("--wait", "--follow", dest="follow", action="store_true",
                     help="stream rank 0's log until the job ends; exit status reflects its final state")  # fmt: skip
    run.add_argument("--status", metavar="RUN_DIR", help="summarise the jobs of RUN_DIR and exit")
    run.add_argument("--after", metavar="RUN_DIR|JOB_ID", help="start only once that job has completed, e.g. a "
                     "fine-tune after its pretrain (SLURM: afterok dependency; locally: waits here)")  # fmt: skip
    run.add_argument("--allow-recipe-change", action="store_true", help="resume the run dir even though this "
                     "config changes its recipe (optim.lr, the model, the data; refused otherwise)")  # fmt: skip
    run.add_argument("--force-unlock", action="store_true", help="take the run dir's lease even if another job "
                     "seems to hold it (only when you know that job is gone)")  # fmt: skip
    sw = p.add_argument_group("sweep: one run per value, each in RUN_DIR/<name>-<its overrides> (SLURM: a job array)")
    sw.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="one run per value; repeated: their product (e.g. --sweep optim.lr=1e-3,3e-3)")  # fmt: skip
    sw.add_argument("--sweep-file", metavar="YAML", help="a YAML list of override sets, one run each "
                    "(- {optim.lr: 1e-3, model.depth: 2}); crossed with any --sweep")  # fmt: skip
    sw.add_argument("--max-parallel", type=int, metavar="N", help="at most N members at once (SLURM: the array's "
                    "%%N, default all; locally default 1: one after another)")  # fmt: skip
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as dotted overrides (strings JSON-quoted so "0" stays a string)."""
    out: list[str] = []
    ints = {"nodes": "launch.nodes", "gpus_per_node": "launch.gpus_per_node", "cpus_per_task": "launch.cpus_per_task"}
    strs = {"mem": "launch.mem", "partition": "launch.partition", "account": "launch.account", "qos": "launch.qos",
            "constraint": "launch.constraint", "exclude": "launch.exclude", "job_name": "launch.job_name",
            "container": "launch.container", "run_dir": "train.run_dir"}  # fmt: skip
    out += [f"{key}={getattr(args, name)}" for name, key in ints.items() if getattr(args, name) is not None]
    out += [f"{key}={json.dumps(getattr(args, name))}" for name, key in strs.items() if getattr(args, name) is not None]
    if args.time is not None:
        out.append(f"launch.time_min={cluster.parse_time_min(args.time)}")
    if args.local:
        out.append("launch.executor=local")
    if args.allow_recipe_change:
        out.append("checkpoint.allow_recipe_change=true")
    return out


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file + dotted overrides + flags (flags win), every path absolute, validated once.

    Ranks may start in another working directory (sbatch --chdir, containers): absolute paths.
    """
    try:
        flags = _flag_overrides(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    defaults: dict[str, str] = {}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # A server started with launch/mlflow_server.py left its URL for the jobs to use.
        url = read_server_url()
        if url:
            defaults["tracking.uri"] = url
    # The run dir's default is named by the dotted overrides only, as the ranks name their MLflow run:
    # a flag (--nodes, --time) changes where the run executes, and the same run resumes under it.
    return load_config(
        args.config, [*args.overrides, *flags], defaults=defaults, absolute_paths=True, run_overrides=args.overrides
    )


@dataclass(frozen=True)
class Choice:
    kind: Literal["slurm", "local"]
    reason: str


def choose_executor(cfg: Config) -> Choice:
    """SLURM when a controller answers (not merely when its binaries exist), else local."""
    if cfg.launch.executor == "local":
        return Choice("local", "forced by --local / launch.executor=local")
    probe = cluster.probe_slurm()
    if probe.ok:
        return Choice("slurm", probe.reason)
    if cfg.launch.executor == "slurm":
        raise checks.Refused(f"launch.executor=slurm but no SLURM cluster answers here: {probe.reason}")
    return Choice("local", f"no SLURM cluster here ({probe.reason}): running locally on this machine")


def _python_command(cfg: Config) -> str:
    """The interpreter each rank starts: this Python, or python3 inside the Apptainer image."""
    if not cfg.launch.container:
        return python_command()
    container.check_image(cfg.launch.container)
    run_dir = Path(cfg.train.run_dir)
    binds = container.bind_paths(
        data=Path(cfg.data.path), run_dir=run_dir, submitit_dir=submitit_folder(run_dir).parent, source=SOURCE_ROOT
    )
    return container.apptainer_python(
        cfg.launch.container, binds=binds, gpus=cfg.launch.gpus_per_node > 0, source=SOURCE_ROOT
    )


def _local_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def run_checks(cfg: Config, kind: str, after: chain.Predecessor | None = None) -> list[str]:
    """All pre-submission checks, in order; the first failure raises checks.Refused."""
    run_dir = Path(cfg.train.run_dir)
    done = [checks.check_run_dir(run_dir), checks.check_no_active_job(run_dir), checks.check_resume(cfg, run_dir)]
    if cfg.launch.container and shutil.which("apptainer") is None:
        if kind == "local":
            raise checks.Refused("--container needs `apptainer` on PATH to run locally; install it or drop --container")
        done.append("container: apptainer is not on PATH here; the compute nodes must have it")
    if cfg.data.decoder == "nvjpeg" and not cfg.launch.gpus_per_node:
        raise checks.Refused(
            "data.decoder=nvjpeg decodes JPEGs on the GPU, and this job's ranks are CPU ranks (no --gpus-per-node); "
            "add --gpus-per-node G, or set data.decoder=pil (decoding in the loader's CPU workers)"
        )
    if kind == "local" and cfg.launch.gpus_per_node:
        need, have = cfg.launch.nodes * cfg.launch.gpus_per_node, _local_gpus()
        if have < need:
            raise checks.Refused(
                f"the local executor needs {need} GPUs ({cfg.launch.nodes} node(s) x {cfg.launch.gpus_per_node}) "
                f"but this machine has {have}; lower --nodes/--gpus-per-node, or submit where SLURM is available"
            )
    done.append(chain.check_finetune(cfg, after))
    done.append(checks.check_tracking(cfg, run_dir))
    done.append(checks.check_data(cfg))
    done.append(checks.check_classes(cfg))
    return done


def rendezvous_plan(cfg: Config, kind: str) -> str:
    from pipeline.train.dist_env import port_for_job

    la = cfg.launch
    backend = "nccl (GPUs)" if la.gpus_per_node else "gloo (CPU)"
    master = "127.0.0.1 (all ranks on this machine)" if kind == "local" else "first host of SLURM_JOB_NODELIST"
    derived = f"20000 + job id % 20000 (e.g. job 4242 -> {port_for_job('4242')})"
    port = f"{la.port} (launch.port)" if la.port else derived
    return "\n".join([
        f"rendezvous: {la.world_size} ranks = {la.nodes} node(s) x {la.tasks_per_node} task(s), backend {backend}",
        "  each rank sets RANK and LOCAL_RANK from submitit's JobEnvironment (SLURM_PROCID, SLURM_LOCALID), "
        f"WORLD_SIZE={la.world_size}, LOCAL_WORLD_SIZE={la.tasks_per_node}",
        f"  MASTER_ADDR={master}",
        f"  MASTER_PORT={port}",
        "  then pipeline.train.run(cfg) reads them through pipeline.train.dist_env.detect()",
    ])  # fmt: skip


def cpu_plan(cfg: Config, kind: str) -> str:
    """How each rank will size its torch threads (pipeline/train/placement.py applies it in the job)."""
    from pipeline.train.placement import cpu_budget

    la, workers = cfg.launch, cfg.data.num_workers
    split = f"torch threads = CPUs - {workers} loader worker(s), at least 1"
    if cfg.train.cpu_threads:
        split = f"torch threads = {cfg.train.cpu_threads} (train.cpu_threads)"
    if la.gpus_per_node:
        split = "torch threads left to torch (GPU ranks)"
    lines = [f'cpus per rank: {split}; every rank prints its figures at start ("cpus: rank ...")']
    if kind == "local":
        cpus, source = cpu_budget(la.world_size)  # all ranks share this machine
        lines.append(f"  here: {cpus} CPU(s) per rank ({source})")
    per_task = f"{la.cpus_per_task} (--cpus-per-task)" if la.cpus_per_task else "the scheduler's default"
    lines.append(
        f"  on SLURM: CPUs per rank = SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE / tasks per node: {per_task}"
    )
    lines.append(
        f"  binding: srun {' '.join(SRUN_CPU_BIND)} (each rank and its loader workers on the rank's own cores)"
    )
    lines.append(decode_budget(cfg))
    return "\n".join(lines)


def run_dir_origin(cfg: Config, overrides: list[str]) -> str:
    """Where the run dir came from: the default (config name + recipe overrides) or the user."""
    if cfg.train.run_dir == str(Path(default_run_dir(cfg.name, overrides)).absolute()):
        return "the default: runs/<config name>-<recipe overrides>; another recipe gets another dir"
    return "set by --run-dir or train.run_dir"


def dry_run(
    cfg: Config, plan: LaunchPlan, choice: Choice, overrides: list[str], after: chain.Predecessor | None = None
) -> int:
    """Print everything a submission would do; run the checks; submit nothing."""
    la = cfg.launch
    print("== resolved config ==")
    print(dump_config(cfg).rstrip())
    print(f"\n== run dir: {cfg.train.run_dir} ({run_dir_origin(cfg, overrides)})")
    if choice.kind == "local":
        print(f"\nlocal executor: {la.world_size} processes on this machine; on a SLURM cluster the same job is:")
    print("\n== sbatch script (written by submitit) ==")
    print(sbatch_script(plan).rstrip())
    print("\n== rank command ==")
    print(f"{plan.python} -u -m submitit.core._submit {plan.folder}")
    print(f"\n== {rendezvous_plan(cfg, choice.kind)}")
    print(f"\n== {cpu_plan(cfg, choice.kind)}")
    print("\n== " + format_plan(memory_plan(cfg, nodes=la.nodes, gpus_per_node=la.gpus_per_node)))
    print("\n== pre-submission checks ==")

    def check() -> None:
        print(f"ok: {lease_state(cfg)}")
        for line in run_checks(cfg, choice.kind, after):
            print(f"ok: {line}")

    return dry_run_verdict(check)


def dry_run_verdict(check: Callable[[], None]) -> int:
    """Run a dry run's checks (they print their own "ok:" lines) and say what a submission would do."""
    try:
        check()
    except checks.Refused as e:
        print(f"REFUSED: {e}")
        print("dry run: nothing submitted (a real submission would be refused)")
        return 1
    print("dry run: nothing submitted")
    return 0


def _slurm_job_active(job_id: str) -> bool | None:
    state = cluster.job_state(job_id)
    return None if state == "UNKNOWN" else state in checks.ACTIVE_STATES


def take_lease(cfg: Config, force: bool) -> lease.Holder:
    """Claim the run dir before anything else is checked or queued (refuses with checks.Refused)."""
    checks.check_run_dir(Path(cfg.train.run_dir))  # the lease is a file in it
    holder = lease.this_process(lease.new_token(), "launcher")
    try:
        note = lease.acquire(Path(cfg.train.run_dir), holder, probe=_slurm_job_active, force=force)
    except lease.RunDirBusy as e:
        raise checks.Refused(str(e)) from None
    if note:
        print(f"note: {note}")
    return holder


def lease_state(cfg: Config) -> str:
    """--dry-run: what taking the run dir's lease would do (refuses like the real launch)."""
    run_dir = Path(cfg.train.run_dir)
    current = lease.read(run_dir)
    if current is None:
        return f"run dir: no lease; a launch would take {run_dir / lease.LEASE}"
    why = lease.stale_reason(current, _slurm_job_active)
    if why is None:
        raise checks.Refused(f"run dir {run_dir} is in use by {current.describe()}; wait, cancel it, or --force-unlock")
    return f"run dir: a launch would take over the stale lease of {current.describe()} ({why})"


def _submit(
    cfg: Config,
    plan: LaunchPlan,
    args: argparse.Namespace,
    argv: list[str],
    holder: lease.Holder,
    after: chain.Predecessor | None = None,
) -> int:
    run_dir = Path(cfg.train.run_dir)
    kill_wait = cluster.kill_wait_s() if plan.kind == "slurm" else None
    if plan.kind == "slurm":
        said = (
            f"{kill_wait:.0f} s (scontrol show config)"
            if kill_wait is not None
            else "unknown (SLURM's default assumed)"
        )
        print(f"on SIGTERM the ranks save if a checkpoint fits in KillWait: {said}")
    try:
        job = submit(plan, RankJob(cfg, tuple(args.overrides), lease_token=holder.token, kill_wait_s=kill_wait))
    except SubmissionError as e:
        lease.release(run_dir, holder.token)
        print(f"error: {plan.kind} refused the job:\n{e}", file=sys.stderr)
        print(f"hint: {_sbatch_hint(str(e))}", file=sys.stderr)
        return 1
    # The job's id now says whether the holder lives (squeue, or the local controller's pid); the job's
    # rank 0 rewrites the lease with its own host and pid when it starts (update() is a no-op then).
    if lease.read(run_dir) == holder:
        lease.update(run_dir, replace(holder, executor=plan.kind, job_id=job.job_id))
    jobfile.record_submission(
        cfg.train.run_dir,
        name=cfg.name,
        job={
            "job_id": job.job_id,
            "executor": plan.kind,
            "nodes": cfg.launch.nodes,
            "tasks_per_node": cfg.launch.tasks_per_node,
            "folder": str(job.folder),
            "command": shlex.join(["python", "launch/submit.py", *argv]),
            **({"after": after.record()} if after is not None else {}),
        },
    )
    out, err = job.rank0_logs
    print(f"submitted {plan.kind} job {job.job_id}: {cfg.launch.world_size} ranks, run dir {cfg.train.run_dir}")
    print(f"  rank 0 log: {out}\n  status: python launch/submit.py --status {cfg.train.run_dir}")
    if not args.follow:
        return 0
    try:
        final = status.follow((out, err), job.state)
    except KeyboardInterrupt:
        print(f"\n[launch] stopped following; job {job.job_id} goes on (--status {cfg.train.run_dir})")
        return 130
    print(f"[launch] job {job.job_id} ended: {final}")
    lines, delivered = status.final_report(Path(cfg.train.run_dir), job.job_id, final)
    for line in lines:
        print(f"[launch] {line}")
    if final != "COMPLETED":
        return 1
    return 0 if delivered else 4


def _sbatch_hint(message: str) -> str:
    low = message.lower()
    if "account" in low or "association" in low:  # before partition: "invalid account/partition combination"
        return "check --account against `sacctmgr show associations user=$USER format=account,partition`"
    if "partition" in low:
        return "check --partition against `sinfo -s` (or leave it out for the default partition)"
    if "qos" in low:
        return "check --qos against `sacctmgr show associations user=$USER format=qos`"
    return "check the #SBATCH lines with --dry-run"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(argv)
    if args.status:
        try:
            print((sweep_table if sweep.is_sweep_dir(args.status) else status).summarise(args.status))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with _job_env(SOURCE_ENV, source_name("launch/submit.py", args.config)):  # the job inherits it: MLflow's Source
        if args.sweep or args.sweep_file:
            from launch import sweep_launch  # builds on this module's checks (it imports it)

            return sweep_launch.launch_sweep(cfg, args, argv)
        return _launch(cfg, args, argv)


@contextmanager
def _job_env(name: str, value: str) -> Iterator[None]:
    """Set a variable the job inherits (SLURM exports the submitter's environment, the local executor copies
    it), then put it back: a caller that runs main() in-process must not pass it on to its next job."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _launch(cfg: Config, args: argparse.Namespace, argv: list[str]) -> int:
    try:
        choice = choose_executor(cfg)
        print(f"executor: {choice.kind} ({choice.reason})")
        plan = LaunchPlan(
            kind=choice.kind,
            launch=cfg.launch,
            run_dir=Path(cfg.train.run_dir),
            job_name=cfg.launch.job_name or cfg.name,
            python=_python_command(cfg),
        )
        after = chain.resolve(args.after, choice.kind) if args.after else None
        if after is not None:
            print(chain.describe_plan(after, choice.kind))
            plan = replace(plan, after=chain.sbatch_dependency(after) if choice.kind == "slurm" else "")
        if args.dry_run:
            return dry_run(cfg, plan, choice, args.overrides, after)
        holder = take_lease(cfg, args.force_unlock)
        print(f"ok: run dir: lease taken ({Path(cfg.train.run_dir) / lease.LEASE}); no other launch can use it")
    except (checks.Refused, container.ContainerError) as e:
        print(f"error: {e}\nnothing was submitted", file=sys.stderr)
        return 1
    try:
        for line in run_checks(cfg, choice.kind, after):
            print(f"ok: {line}")
        if after is not None and plan.kind == "local" and not after.completed:
            after = chain.wait_local(after, Path(cfg.train.run_dir))  # the local afterok: nothing queued meanwhile
            print(f"after: {after.describe()} completed; ok: {checks.check_finetune(cfg)}")
    except BaseException as e:
        lease.release(Path(cfg.train.run_dir), holder.token)
        if not isinstance(e, checks.Refused):
            raise
        print(f"error: {e}\nnothing was submitted", file=sys.stderr)
        return 1
    return _submit(cfg, plan, args, argv, holder, after)


if __name__ == "__main__":
    sys.exit(main())
