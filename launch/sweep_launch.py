"""``launch/submit.py --sweep``: validate every member, then queue them as one SLURM job array (or
run them here, N at a time), grouped under a parent MLflow run.

Order, so that a refusal leaves nothing behind: expand and validate every member's config (an
unknown key, an empty value list, two members sharing a run dir: exit 2); on SLURM, the array's
size against MaxArraySize and one resource request for all; then each member's run dir lease and
its pre-submission checks, exactly a single submit's (any failure: the leases taken are released,
nothing is queued, exit 1 naming the member); only then the parent run and the array.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from launch import chain, checks, cluster, container, jobfile, submit, sweep, sweep_table
from launch.executor import LaunchPlan, RankJob, SubmissionError, SubmittedJob, submit_array
from launch.executor import submit as submit_job
from launch.sweep import Member
from pipeline.config import Config, ConfigError
from pipeline.tracking import ParentRun, TrackingUnavailable, end_parent_run, experiment_for, open_parent_run
from pipeline.tracking.tags import TAG_NOTE
from pipeline.train import lease


def _member_config(args: argparse.Namespace, own: list[str], run_dir: Path) -> Config:
    """A member's config by the single submit's path: base overrides + its own, run dir set."""
    member = argparse.Namespace(**vars(args))
    member.overrides, member.run_dir = [*args.overrides, *own], str(run_dir)
    return submit.resolve_config(member)


def _prepare(base: Config, args: argparse.Namespace) -> tuple[submit.Choice, Path, list[Member], dict]:
    """Executor, sweep dir, validated members and sweep.json's content. ConfigError: a bad sweep
    definition; checks.Refused: the cluster cannot take it (counted before any member is built)."""
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {args.max_parallel}")
    sets = sweep.expand(args.sweep, args.sweep_file)
    choice = submit.choose_executor(base)
    print(f"executor: {choice.kind} ({choice.reason})")
    if choice.kind == "slurm":
        print(f"ok: {check_array_size(len(sets))}")
    sweep_dir = sweep.sweep_dir_for(base, args.overrides)
    resolve = lambda own, run_dir: _member_config(args, own, run_dir)  # noqa: E731
    members = sweep.build_members(sets, sweep_dir, base.name, resolve)
    if choice.kind == "slurm":
        check_one_allocation(members)
    return choice, sweep_dir, members, _record(sweep_dir, args, members)


def check_array_size(count: int) -> str:
    """SLURM: the array's indices 0..count-1 must stay below the cluster's MaxArraySize."""
    limit = cluster.max_array_size()
    if limit is not None and count > limit:
        raise checks.Refused(
            f"the sweep has {count} members but this cluster's MaxArraySize is {limit} (scontrol show "
            f"config): split it into sweeps of at most {limit} members (e.g. fewer values per --sweep)"
        )
    return f"job array: {count} tasks (MaxArraySize {limit if limit is not None else 'unknown'})"


def check_one_allocation(members: list[Member]) -> None:
    """SLURM: a job array has one resource request, so every member must ask for the same launch.*."""
    for m in members[1:]:
        if m.cfg.launch != members[0].cfg.launch:
            raise checks.Refused(
                f"sweep {m.describe()} asks for other resources (launch.*) than member 0: a job array has one "
                "resource request; sweep launch.* keys with separate submits"
            )


def _check_members(members: list[Member], kind: str, after: chain.Predecessor | None = None) -> None:
    for m in members:
        try:
            done = submit.run_checks(m.cfg, kind, after)
        except checks.Refused as e:
            raise checks.Refused(f"sweep {m.describe()}: {e}") from None
        print(f"ok: {m.describe()}: {len(done)} checks passed ({m.run_dir})")


def _dry_run(members: list[Member], kind: str, after: chain.Predecessor | None) -> int:
    print("\n== pre-submission checks, every member ==")

    def check() -> None:
        for m in members:
            print(f"ok: {m.describe()}: {submit.lease_state(m.cfg)}")
        _check_members(members, kind, after)

    return submit.dry_run_verdict(check)


def _take_leases(members: list[Member], force: bool) -> list[lease.Holder]:
    holders: list[lease.Holder] = []
    try:
        for m in members:
            holders.append(submit.take_lease(m.cfg, force))
    except checks.Refused as e:
        _release(members, holders)
        raise checks.Refused(f"sweep {members[len(holders)].describe()}: {e}") from None
    return holders


def _release(members: list[Member], holders: list[lease.Holder]) -> None:
    for m, h in zip(members, holders, strict=False):
        lease.release(m.run_dir, h.token)


def launch_sweep(base: Config, args: argparse.Namespace, argv: list[str]) -> int:
    """--sweep / --sweep-file: the exit status of launch/submit.py."""
    try:
        choice, sweep_dir, members, record = _prepare(base, args)
        print(f"sweep {record['sweep_id']}: {len(members)} members in {sweep_dir}")
        print(sweep_table.expansion(record))
        # A sweep of fine-tunes over one pretrain: every member waits for it (one afterok for the array).
        after = chain.resolve(args.after, choice.kind) if args.after else None
        if after is not None:
            print(chain.describe_plan(after, choice.kind))
        if args.dry_run:
            return _dry_run(members, choice.kind, after)
        holders = _take_leases(members, args.force_unlock)
    except ConfigError as e:
        print(f"error: {e}\nnothing was submitted", file=sys.stderr)
        return 2
    except (checks.Refused, container.ContainerError) as e:
        print(f"error: {e}\nnothing was submitted", file=sys.stderr)
        return 1
    try:
        _check_members(members, choice.kind, after)
        if after is not None and choice.kind == "local" and not after.completed:
            after = chain.wait_local(after, members[0].run_dir)  # the local afterok: nothing started meanwhile
        parent = _parent_run(record, members)
    except BaseException as e:
        _release(members, holders)
        if not isinstance(e, (checks.Refused, TrackingUnavailable)):
            raise
        print(f"error: {e}\nnothing was submitted", file=sys.stderr)
        return 1
    members = [_tagged(m, record["sweep_id"], parent) for m in members]
    pairs = zip(members, holders, strict=True)
    jobs = [RankJob(m.cfg, (*args.overrides, *m.overrides), lease_token=h.token) for m, h in pairs]
    command = shlex.join(["python", "launch/submit.py", *argv])
    if choice.kind == "slurm":
        return _submit_array(sweep_dir, record, members, jobs, holders, args, command, parent, after)
    todo = list(zip(members, jobs, holders, strict=True))
    return _run_here(sweep_dir, record, todo, args.max_parallel or 1, command, after)


def _record(sweep_dir: Path, args: argparse.Namespace, members: list[Member]) -> dict:
    """sweep.json's content: a resubmit of the same sweep keeps its id and parent run (members resume)."""
    definition = {"config": args.config, "overrides": list(args.overrides), "sweep": list(args.sweep),
                  "sweep_file": args.sweep_file, "max_parallel": args.max_parallel}  # fmt: skip
    if sweep.is_sweep_dir(sweep_dir):
        old = sweep.read_record(sweep_dir)
        if [m["overrides"] for m in old["members"]] != [list(m.overrides) for m in members]:
            raise ConfigError(f"{sweep_dir} holds another sweep ({old['sweep_id']}, {len(old['members'])} "
                              "members); pick another --run-dir for this one")  # fmt: skip
        return {**old, "definition": definition}
    name = sweep_dir.name.removesuffix(sweep.SWEEP_SUFFIX)
    return sweep.new_record(f"{name}-{uuid.uuid4().hex[:8]}", definition, members)


def _parent_run(record: dict, members: list[Member]) -> ParentRun | None:
    """The MLflow run the members nest under; reused when the sweep is resubmitted."""
    cfg = members[0].cfg
    if record.get("parent_run_id") or not cfg.tracking.enabled:
        prev = record.get("parent_run_id")
        return ParentRun(record["tracking_uri"], record["experiment_id"], prev) if prev else None
    varying = record["varying"]
    note = f"Sweep `{record['sweep_id']}`: {len(members)} runs over {', '.join(varying) or 'one setting'}."
    parent = open_parent_run(
        cfg.tracking, run_dir=members[0].run_dir, experiment=experiment_for(cfg),
        run_name=Path(record["members"][0]["run_dir"]).parent.name,
        params={"sweep.members": str(len(members)), "sweep.varying": ",".join(varying),
                "sweep.definition": json.dumps(record["definition"]),
                **{f"sweep.member.{m.index}": " ".join(m.overrides) for m in members[:50]}},
        tags={sweep.TAG_SWEEP_ID: record["sweep_id"], TAG_NOTE: note},
    )  # fmt: skip
    if parent is not None:
        record.update(parent_run_id=parent.run_id, tracking_uri=parent.uri, experiment_id=parent.experiment_id)
        print(f"ok: parent MLflow run {parent.run_id} (experiment {parent.experiment_id}) holds the sweep")
    return parent


def _tagged(m: Member, sweep_id: str, parent: ParentRun | None) -> Member:
    """The member's run carries the sweep id and nests under the parent (tracking.* keys: not the recipe)."""
    tags = {**m.cfg.tracking.tags, sweep.TAG_SWEEP_ID: sweep_id}
    if parent is not None:
        tags[sweep.TAG_PARENT_RUN] = parent.run_id
    return replace(m, cfg=replace(m.cfg, tracking=replace(m.cfg.tracking, tags=tags)))


def _note_job(
    m: Member, job: SubmittedJob, holder: lease.Holder | None, command: str, after: chain.Predecessor | None
) -> None:
    """What a single submit notes after queueing: the lease's job id and job.json's jobs entry."""
    if holder is not None and lease.read(m.run_dir) == holder:
        lease.update(m.run_dir, replace(holder, executor=job.kind, job_id=job.job_id))
    jobfile.record_submission(m.run_dir, name=m.cfg.name, job={
        "job_id": job.job_id, "executor": job.kind, "nodes": m.cfg.launch.nodes,
        "tasks_per_node": m.cfg.launch.tasks_per_node, "folder": str(job.folder), "command": command,
        **({"after": after.record()} if after is not None else {}),
    })  # fmt: skip


def _save(sweep_dir: Path, record: dict, jobs: dict[int, SubmittedJob], kind: str, max_parallel: int) -> None:
    for m in record["members"]:
        if m["index"] in jobs:
            m["job_id"] = jobs[m["index"]].job_id
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ids = [j.job_id for j in jobs.values()]
    record["submissions"].append({"submitted": when, "executor": kind, "job_ids": ids, "max_parallel": max_parallel})
    sweep.write_record(sweep_dir, record)


def _submit_array(sweep_dir: Path, record: dict, members: list[Member], jobs: list[RankJob],
                  holders: list[lease.Holder], args: argparse.Namespace, command: str,
                  parent: ParentRun | None, after: chain.Predecessor | None) -> int:  # fmt: skip
    cfg = members[0].cfg
    at_once = min(args.max_parallel or len(members), len(members))
    at_sweep_dir = replace(cfg, train=replace(cfg.train, run_dir=str(sweep_dir)))  # container binds: every member
    plan = LaunchPlan(kind="slurm", launch=cfg.launch, run_dir=sweep_dir, job_name=cfg.launch.job_name or
                      f"{cfg.name}-sweep", python=submit._python_command(at_sweep_dir),
                      after=chain.sbatch_dependency(after))  # fmt: skip
    kill_wait = cluster.kill_wait_s()
    try:
        submitted = submit_array(plan, [replace(j, kill_wait_s=kill_wait) for j in jobs], at_once)
    except SubmissionError as e:
        _release(members, holders)
        if parent is not None:
            end_parent_run(parent, "FAILED")
        print(f"error: slurm refused the job array:\n{e}", file=sys.stderr)
        return 1
    for m, job, h in zip(members, submitted, holders, strict=True):
        _note_job(m, job, h, command, after)
    _save(sweep_dir, record, {m.index: j for m, j in zip(members, submitted, strict=True)}, "slurm", at_once)
    array_id = submitted[0].job_id.partition("_")[0]
    print(f"submitted slurm job array {array_id}: {len(members)} members, at most {at_once} at once, "
          f"sweep dir {sweep_dir}")  # fmt: skip
    print(f"  status: python launch/submit.py --status {sweep_dir}\n  compare: python launch/compare.py {sweep_dir}")
    if not args.follow:
        return 0
    return _wait_and_report(sweep_dir, {m.index: j for m, j in zip(members, submitted, strict=True)})


def _wait_and_report(sweep_dir: Path, running: dict[int, SubmittedJob], poll_s: float = 5.0) -> int:
    """--follow: wait for every member to end, then print the sweep's table; 0 when all COMPLETED."""
    final: dict[int, str] = {}
    while running:
        _reap(running, final, poll_s)
    print(sweep_table.summarise(sweep_dir))
    return 0 if all(s == "COMPLETED" for s in final.values()) else 1


def _run_here(sweep_dir: Path, record: dict, todo: list[tuple[Member, RankJob, lease.Holder]], at_once: int,
              command: str, after: chain.Predecessor | None) -> int:  # fmt: skip
    """The local executor: members start as others end, ``at_once`` at a time; a failure stops no other."""
    waiting, running, submitted, final = list(todo), {}, {}, {}
    sweep.write_record(sweep_dir, record)
    while waiting or running:
        while waiting and len(running) < at_once:
            m, rank_job, holder = waiting.pop(0)
            plan = LaunchPlan(kind="local", launch=m.cfg.launch, run_dir=m.run_dir, job_name=m.cfg.name,
                              python=submit._python_command(m.cfg))  # fmt: skip
            job = submit_job(plan, rank_job)
            _note_job(m, job, holder, command, after)
            running[m.index] = submitted[m.index] = job
            print(f"[sweep] {m.describe()}: local job {job.job_id}, run dir {m.run_dir}", flush=True)
        _reap(running, final)
    _save(sweep_dir, record, submitted, "local", at_once)
    print(sweep_table.summarise(sweep_dir))
    return 0 if all(s == "COMPLETED" for s in final.values()) else 1


def _reap(running: dict[int, SubmittedJob], final: dict[int, str], poll_s: float = 1.0) -> None:
    """Wait ``poll_s``, then move the members that ended from ``running`` to ``final`` (their state)."""
    time.sleep(poll_s)
    for i, job in list(running.items()):
        state = job.state()
        if state in cluster.FINAL_STATES:
            print(f"[sweep] member {i} ({job.kind} job {job.job_id}) ended: {state}", flush=True)
            running.pop(i)
            final[i] = state
