"""Everything that touches submitit (the only module importing it): executors, the sbatch script,
and :class:`RankJob`, the callable every rank runs.

Requeue protocol (submitit 1.5.4, core/job_environment.py): submitit binds USR2 to
``SignalHandler.checkpoint_and_try_requeue`` before our callable starts. On global rank 0 that
handler calls our ``checkpoint()``, pickles the ``DelayedSubmission`` it returns, runs
``scontrol requeue`` (local executor: exits with code 144, which restarts the tasks) and exits; on
every other rank it only logs. ``countdown = max_num_timeout - timed_out`` decides whether a
*timeout* may requeue again; a signal counts as a timeout once the job ran
min(80 %, limit - 10 min) of its time limit (always, for limits under 12.5 min), as a preemption
otherwise, and preemptions never use up the countdown. A ZeRO save is collective, so rank 0 alone
cannot save in that handler: the training engine replaces it with a flag that all ranks agree on
at the next step boundary, all ranks save, ``run()`` returns "preempted", and only then do we hand
over to submitit's handler (kept by ``pipeline.train.preemption.previous_handler()``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import FailedJobError
from submitit.helpers import DelayedSubmission

from launch import cluster, jobfile
from pipeline.config import Config, LaunchConfig

log = logging.getLogger(__name__)

ExecutorKind = Literal["slurm", "local"]
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the project checkout the job imports from
SUBMITIT_DIR = "submitit"
# Each task on its allocated cores; its loader workers inherit that mask, and the rank sizes its torch
# threads from the same allocation (pipeline/train/placement.py). A no-op where TaskPlugin=task/none.
SRUN_CPU_BIND = ("--cpu-bind=cores",)


class SubmissionError(RuntimeError):
    """The scheduler refused the job (e.g. sbatch's error for a bad partition or account)."""


def submitit_folder(run_dir: Path) -> Path:
    """Per-job folder for submitit's pickles and logs; %j keeps jobs apart (SLURM ids can repeat)."""
    return run_dir / SUBMITIT_DIR / "%j"


@dataclass(frozen=True)
class LaunchPlan:
    """What to submit where; built by launch/submit.py after the pre-submission checks."""

    kind: ExecutorKind
    launch: LaunchConfig
    run_dir: Path
    job_name: str
    python: str  # the interpreter command submitit runs (wrapped by Apptainer with --container)
    after: str = ""  # sbatch --dependency, e.g. "afterok:42" (launch/chain.py); the local executor waits instead

    @property
    def folder(self) -> Path:
        return submitit_folder(self.run_dir)

    @property
    def setup(self) -> list[str]:
        # The job imports `launch.executor` (RankJob) and `pipeline` from the submitted checkout.
        return [f"export PYTHONPATH={shlex.quote(str(SOURCE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}", *FORWARD_SIGNALS]


# `scancel -b --signal=USR2` (and a TERM sent to the batch shell alone) reaches only the batch
# shell, which dies of it: no save, no requeue. submitit's script runs `srun ...` in the foreground,
# and bash runs a trap only after the foreground command returns, so these setup lines shadow
# `srun` with a function that runs it in the background and waits, forwarding the signals to srun
# (which passes them to every task). A signal sent to the whole job reaches the tasks directly
# too; the ranks treat repeats as one. Only sbatch's public `setup` lines are used.
FORWARD_SIGNALS = (
    "srun() {",
    '  command srun "$@" &',
    "  local pid=$! rc=0",
    "  trap 'kill -USR2 $pid 2>/dev/null' USR2",
    "  trap 'kill -TERM $pid 2>/dev/null' TERM",
    "  while :; do",
    '    wait "$pid"; rc=$?',
    '    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # a trap ended the wait',
    "    break",
    "  done",
    "  trap - USR2 TERM",
    '  return "$rc"',
    "}",
)


def sbatch_parameters(plan: LaunchPlan) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch's names) for ``plan``; empty settings are left out."""
    la = plan.launch
    params: dict[str, Any] = {
        "job_name": plan.job_name,
        "time": la.time_min,
        "nodes": la.nodes,
        "ntasks_per_node": la.tasks_per_node,  # one task per GPU (or per CPU rank)
        "signal_delay_s": la.signal_delay_s,  # USR2 this long before the limit
        "setup": plan.setup,
        "srun_args": list(SRUN_CPU_BIND),
        "additional_parameters": {"requeue": True},  # allow `scontrol requeue` even where JobRequeue=0
    }
    optional = {
        "gpus_per_node": la.gpus_per_node,
        "cpus_per_task": la.cpus_per_task,
        "mem": la.mem,
        "partition": la.partition,
        "account": la.account,
        "qos": la.qos,
        "constraint": la.constraint,
        "exclude": la.exclude,
    }
    params.update({k: v for k, v in optional.items() if v})
    if plan.after:  # a predecessor that does not complete cancels this job rather than leave it pending
        params["dependency"] = plan.after
        params["additional_parameters"]["kill_on_invalid_dep"] = "yes"
    return params


def sbatch_script(plan: LaunchPlan) -> str:
    """The sbatch script submitit writes for ``plan`` (for --dry-run; needs no SLURM installed)."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor itself calls

    command = " ".join([plan.python, "-u -m submitit.core._submit", shlex.quote(str(plan.folder))])
    return _make_sbatch_string(command=command, folder=plan.folder, **sbatch_parameters(plan))


def _make_executor(plan: LaunchPlan) -> submitit.core.core.PicklingExecutor:
    """A SLURM or local executor. We pick the cluster ourselves: AutoExecutor.which() picks SLURM
    whenever `srun` is on PATH, and AutoExecutor cannot pass the local executor's signal delay."""
    la = plan.launch
    if plan.kind == "slurm":
        ex = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=la.max_timeouts, python=plan.python)
        ex.update_parameters(**sbatch_parameters(plan))
        return ex
    ex = submitit.LocalExecutor(folder=plan.folder, max_num_timeout=la.max_timeouts, python=plan.python)
    # One machine plays all nodes: nodes x tasks_per_node processes, GPUs 0..n-1 visible to them.
    ex.update_parameters(
        timeout_min=la.time_min,
        tasks_per_node=la.world_size,
        gpus_per_node=la.nodes * la.gpus_per_node,
        signal_delay_s=la.signal_delay_s,
    )
    return ex


@dataclass
class SubmittedJob:
    kind: ExecutorKind
    job: Any  # submitit.Job

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    @property
    def folder(self) -> Path:
        return Path(self.job.paths.folder)

    @property
    def rank0_logs(self) -> tuple[Path, Path]:
        return Path(self.job.paths.stdout), Path(self.job.paths.stderr)

    def state(self) -> str:
        """SLURM-style state: PENDING/RUNNING/... while active, then COMPLETED or FAILED etc."""
        if self.kind == "slurm":
            return cluster.job_state(self.job_id)
        if not self.job.done():
            return "RUNNING"
        return "COMPLETED" if self.job.exception() is None else "FAILED"


# A submission from inside a job must not pass that job's identity on (submitit's clean_env() does
# the same, but also drops SLURM_CONF, which says where the cluster is).
_JOB_VARS = ("SLURM_", "SLURMD_", "SRUN_", "SUBMITIT_")
_RANK_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_KEEP = ("SLURM_CONF",)


@contextlib.contextmanager
def _outside_job_env() -> Iterator[None]:
    hidden = {
        k: os.environ.pop(k)
        for k in list(os.environ)
        if (k.startswith(_JOB_VARS) or k in _RANK_VARS) and k not in _KEEP
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


def submit(plan: LaunchPlan, rank_job: RankJob) -> SubmittedJob:
    """Queue ``rank_job`` on every rank; raises SubmissionError with the scheduler's words."""
    executor = _make_executor(plan)
    if plan.kind == "local":
        # sbatch runs the setup lines; the local executor inherits our environment instead.
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = f"{SOURCE_ROOT}{os.pathsep + old if old else ''}"
    captured = io.StringIO()
    try:
        with _outside_job_env(), contextlib.redirect_stderr(captured):
            job = executor.submit(rank_job)
    except FailedJobError as e:
        raise SubmissionError(str(e).strip() or captured.getvalue().strip()) from None
    return SubmittedJob(plan.kind, job)


def submit_array(plan: LaunchPlan, rank_jobs: list[RankJob], max_parallel: int) -> list[SubmittedJob]:
    """Queue one SLURM job array (a sweep): task i runs ``rank_jobs[i]`` on ``plan``'s allocation, at
    most ``max_parallel`` tasks at once (sbatch's ``--array=0-N%max_parallel``). Each task is a job
    of its own for SLURM (id ``<array>_<i>``): its own requeue, its own submitit folder."""
    assert plan.kind == "slurm", "job arrays are SLURM's; the local executor runs a sweep's members itself"
    executor = _make_executor(plan)
    executor.update_parameters(array_parallelism=max_parallel)
    captured = io.StringIO()
    try:
        with _outside_job_env(), contextlib.redirect_stderr(captured), executor.batch():
            jobs = [executor.submit(rank_job) for rank_job in rank_jobs]
    except FailedJobError as e:
        raise SubmissionError(str(e).strip() or captured.getvalue().strip()) from None
    return [SubmittedJob(plan.kind, job) for job in jobs]


def _rendezvous(env: Any, fixed_port: int) -> dict[str, str]:
    """torchrun-style variables for this rank, from submitit's JobEnvironment (the engine's seam
    ``pipeline.train.dist_env.detect()`` reads these first, so SLURM and local runs are the same)."""
    from pipeline.train.dist_env import port_for_job

    local = env.cluster == "local"
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
        # All local ranks share this machine; SLURM: the first host of the job's node list.
        "MASTER_ADDR": "127.0.0.1" if local else env.hostnames[0],
        "MASTER_PORT": str(fixed_port or port_for_job(env.job_id)),
    }


def _hand_over_to_submitit() -> None:
    """After all ranks saved: let submitit's USR2 handler checkpoint() + requeue (rank 0) or log (others)."""
    from pipeline.train import preemption

    handler = preemption.previous_handler()
    if not isinstance(getattr(handler, "__self__", None), SignalHandler):
        log.warning("stopped on USR2 but submitit's signal handler is not installed: not requeued")
        return
    handler(signal.SIGUSR2, None)  # rank 0 exits here (after requeueing); other ranks return


@dataclass
class RankJob:
    """The callable submitit runs once per rank: rendezvous, train, requeue when preempted."""

    cfg: Config
    overrides: tuple[str, ...] = ()
    requeues: int = 0  # requeues through checkpoint() so far (the local executor's restart count)
    lease_token: str = ""  # the run dir's lease the launcher took; rank 0 adopts it (pipeline.train.lease)
    kill_wait_s: float | None = None  # SLURM's KillWait (SIGTERM -> SIGKILL); None: SLURM's default

    def __call__(self) -> Any:
        from pipeline.train import lease

        env = submitit.JobEnvironment()
        os.environ.update(_rendezvous(env, self.cfg.launch.port))
        os.environ.update({lease.TOKEN_ENV: self.lease_token, lease.JOB_ID_ENV: str(env.job_id),
                           lease.EXECUTOR_ENV: "local" if env.cluster == "local" else "slurm"})  # fmt: skip
        restart = int(os.environ.get("SLURM_RESTART_COUNT", self.requeues))
        os.environ["PIPELINE_REQUEUE_COUNT"] = str(restart)
        run_dir, rank0 = Path(self.cfg.train.run_dir), env.global_rank == 0
        if rank0:
            jobfile.record_attempt_start(run_dir, job_id=env.job_id, restart=restart, hosts=list(env.hostnames))
        from pipeline.logs import announce_start

        announce_start(env.global_rank, f"rank {env.global_rank} of {env.num_tasks}, job {env.job_id} (restart "
                       f"{restart}) on {env.hostname}, run dir {run_dir}; loading torch and DeepSpeed")  # fmt: skip
        from pipeline.stages import stage_for  # here, not at the top: the submitter never imports torch
        from pipeline.train import run

        def record_end(result: Any, outcome: str) -> None:
            undelivered = {"undelivered": result.undelivered} if result.undelivered else {}
            jobfile.record_attempt_end(
                run_dir, job_id=env.job_id, result=outcome, step=result.step, mlflow_run_id=result.run_id,
                **undelivered,
            )  # fmt: skip

        try:
            result = run(
                self.cfg, stage=stage_for(self.cfg), overrides=list(self.overrides), kill_wait_s=self.kill_wait_s,
                on_terminated=(lambda res: record_end(res, "cancelled")) if rank0 else None,
            )  # fmt: skip
        except BaseException as e:
            if rank0 and isinstance(e, SystemExit) and _REQUEUED_BY_SUBMITIT:
                # USR2 before the engine's own handler was in place (start-up): submitit's handler called
                # checkpoint(), requeued the job and exited. A preemption, not a failure.
                jobfile.record_attempt_end(run_dir, job_id=env.job_id, result="preempted", error=EARLY_USR2)
                raise
            # Every rank says what stopped it: rank 0 often only sees "Connection closed by peer".
            host = env.hostnames[env.node] if env.node < len(env.hostnames) else env.hostname
            error = f"{type(e).__name__}: {e}"
            jobfile.record_failure(
                run_dir, job_id=env.job_id, restart=restart, rank=env.global_rank, host=host, error=error
            )
            if rank0:
                jobfile.record_attempt_end(run_dir, job_id=env.job_id, result="failed", error=error[:500])
            raise
        outcome = "cancelled" if result.status == "terminated" else result.status
        if rank0 and outcome != "cancelled":  # a stop on SIGTERM was marked inside run(), before SIGKILL
            record_end(result, outcome)
        if rank0 and outcome == "cancelled" and _usr2_within(self._linger_s()):
            # Stopped on SIGTERM (attempt marked, MLflow run KILLED). A USR2 soon after is a
            # preemption announced submitit's way (TERM, then USR2): requeue.
            outcome = "preempted"
            jobfile.amend_attempt(run_dir, job_id=env.job_id, result=outcome)
        if outcome == "preempted":
            _hand_over_to_submitit()
        else:
            # Done: a USR2 that arrives now (the limit is near) must neither requeue a finished job
            # through submitit's handler nor, during interpreter exit, kill the rank and fail the job.
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return result

    def _linger_s(self) -> float:
        """How long rank 0 waits for a USR2 after a TERM: until shortly before SIGKILL, at most 5 s."""
        from pipeline.train import preemption

        kill_wait = preemption.DEFAULT_KILL_WAIT_S if self.kill_wait_s is None else self.kill_wait_s
        left = kill_wait - preemption.seconds_since_terminate() - preemption.FINISH_MARGIN_S
        return max(0.0, min(LINGER_MAX_S, left))

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit on rank 0 after the save: the same config and run dir, so the engine
        resumes from the newest complete checkpoint and reopens the same MLflow run."""
        global _REQUEUED_BY_SUBMITIT
        _REQUEUED_BY_SUBMITIT = True  # submitit requeues and exits next (see __call__)
        return DelayedSubmission(replace(self, requeues=self.requeues + 1))


LINGER_MAX_S = 5.0
_REQUEUED_BY_SUBMITIT = False  # set when submitit's USR2 handler asked this rank for its resubmission
EARLY_USR2 = "USR2 during start-up: requeued without a save; the next attempt resumes from the newest checkpoint"


def _usr2_within(seconds: float) -> bool:
    """Whether a USR2 arrives within ``seconds`` (it sets the same flag the training loop polls)."""
    from pipeline.train import preemption

    preemption.install()
    try:
        deadline = time.monotonic() + seconds
        while not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        return preemption.requested()
    finally:
        preemption.uninstall()


def python_command() -> str:
    return shlex.quote(sys.executable)
