"""The run dir's lease: atomic claim, refusal naming the holder, stale take-over, heartbeat, requeue.

Real processes throughout: a dead holder is a process that really exited; the race is real
processes started together.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.proc import pid_start
from pipeline.train import lease
from pipeline.train.lease import STALE_AFTER_S, HeldLease, RunDirBusy, acquire, read, release, this_process

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(run_dir: Path, h: lease.Holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / lease.LEASE).write_text(json.dumps(h.__dict__))


def test_first_claim_wins_and_a_second_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = replace(this_process(lease.new_token(), "job", executor="local", job_id=str(os.getpid())), since=1e9)
    assert acquire(tmp_path, first) is None
    held = json.loads((tmp_path / "lease.json").read_text())
    assert held["token"] == first.token and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["user"] and held["job_id"] == str(os.getpid()) and held["heartbeat"] > time.time() - 60
    second = this_process(lease.new_token(), "launcher")
    with pytest.raises(RunDirBusy) as e:
        acquire(tmp_path, second)
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(1e9))
    assert str(e.value).startswith(
        f"run dir {tmp_path} is in use by job {os.getpid()} (local) of user {first.user} on host "
        f"{socket.gethostname()} (pid {os.getpid()}), since {since}, last heartbeat "
    )
    assert f"cancel it (`kill {os.getpid()}` on {socket.gethostname()}), or" in str(e.value)
    assert "--force-unlock" in str(e.value)
    assert read(tmp_path).token == first.token  # untouched
    assert "took over" in acquire(tmp_path, second, force=True)
    assert read(tmp_path).token == second.token


def test_dead_holder_with_an_old_heartbeat_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = _dead_pid()
    old = time.time() - 3600
    dead = replace(this_process("dead", "job"), pid=pid, pid_start="1", since=old, heartbeat=old)
    _write(tmp_path, dead)
    mine = this_process(lease.new_token(), "job")
    note = acquire(tmp_path, mine)
    assert note.startswith(
        f"took over the lease of {tmp_path} from a run started without a scheduler of user {dead.user}"
    )
    assert re.search(
        rf"last heartbeat 36\d\d s ago: its process \(pid {pid}\) on {socket.gethostname()} is gone$", note
    )
    assert read(tmp_path).token == mine.token and note in caplog.text
    # A pid that lives on but belongs to another process (reused) is gone too: its start time differs.
    reused = replace(dead, token="reused", pid=os.getpid(), pid_start="0")
    assert lease.holder_gone(reused) is True
    assert lease.holder_gone(replace(reused, pid_start=pid_start(os.getpid()))) is False


def test_unverifiable_holder_is_respected_until_its_heartbeat_is_old(tmp_path: Path) -> None:
    now = time.time()
    remote = replace(this_process("remote", "job"), host="node-elsewhere", pid=1234, since=now, heartbeat=now - 60)
    _write(tmp_path, remote)
    with pytest.raises(RunDirBusy, match=r"on host node-elsewhere \(pid 1234\).*last heartbeat 60 s ago"):
        acquire(tmp_path, this_process(lease.new_token(), "launcher"))
    _write(tmp_path, replace(remote, heartbeat=now - STALE_AFTER_S - 5))
    note = acquire(tmp_path, this_process(lease.new_token(), "launcher"))
    assert note.endswith(f"no heartbeat for {STALE_AFTER_S + 5:.0f} s (> 300 s) and its job cannot be checked here")


def test_a_slurm_job_in_the_queue_keeps_its_lease_whatever_its_heartbeat(tmp_path: Path) -> None:
    old = time.time() - 3600  # a requeued job waiting for nodes does not beat
    queued = replace(this_process("q", "job", executor="slurm", job_id="42"), pid=_dead_pid(), heartbeat=old)
    _write(tmp_path, queued)
    asked: list[str] = []

    def squeue(job_id: str) -> bool | None:
        asked.append(job_id)
        return True

    with pytest.raises(RunDirBusy, match=r"in use by job 42 \(slurm\).*cancel it \(`scancel 42`\)"):
        acquire(tmp_path, this_process(lease.new_token(), "launcher"), probe=squeue)
    assert asked == ["42"]
    note = acquire(tmp_path, this_process(lease.new_token(), "launcher"), probe=lambda job_id: False)
    assert note.endswith("its job has ended")


def test_same_token_adopts_keeping_since(tmp_path: Path) -> None:
    launcher = replace(this_process(lease.new_token(), "launcher"), since=1234.0)
    acquire(tmp_path, launcher)
    job = this_process(launcher.token, "job", executor="local", job_id="99")
    assert acquire(tmp_path, job) == "adopted the lease taken by the launcher"
    now = read(tmp_path)
    assert (now.role, now.job_id, now.since, now.token) == ("job", "99", 1234.0, launcher.token)


def test_removing_a_stale_lease_never_removes_a_fresh_one_taken_in_between(tmp_path: Path) -> None:
    fresh = this_process(lease.new_token(), "job")
    _write(tmp_path, fresh)
    assert lease._remove_if(tmp_path / lease.LEASE, "the-stale-token") is False
    assert read(tmp_path) == fresh  # put back
    assert release(tmp_path, "not-ours") is False and read(tmp_path) == fresh
    assert release(tmp_path, fresh.token) is True and read(tmp_path) is None


def test_heartbeat_refreshes_and_the_lease_is_kept_for_a_requeue_released_at_the_end(tmp_path: Path) -> None:
    h = this_process(lease.new_token(), "job")
    acquire(tmp_path, h)
    held = HeldLease(tmp_path, h, every_s=0.2)
    time.sleep(1.0)
    assert read(tmp_path).heartbeat > h.heartbeat + 0.5
    held.end("KILLED")  # stopped on USR2 for a requeue
    kept = read(tmp_path)
    assert kept is not None and kept.token == h.token
    time.sleep(0.5)
    assert read(tmp_path).heartbeat == kept.heartbeat  # the heartbeat thread stopped
    held = HeldLease(tmp_path, this_process(h.token, "job"), every_s=0.2)  # the requeued attempt adopts it
    held.end("FINISHED")
    assert not (tmp_path / lease.LEASE).exists()


# Each racer stays alive until the test closes its stdin: a winner that exited would leave a
# dead holder's lease, which a racer still starting up (a loaded 2-core CI machine) may rightly
# take over. Racers sleep to just before the moment, then spin, so the spinning does not starve
# the others' start-up.
RACER = """
import sys, time
from pathlib import Path
from pipeline.train import lease
start = float(sys.argv[2])
late = time.time() > start
time.sleep(max(0.0, start - time.time() - 0.2))
while time.time() < start:
    pass
try:
    lease.acquire(Path(sys.argv[1]), lease.this_process(lease.new_token(), "launcher"))
    print("WON", "late" if late else "")
except lease.RunDirBusy as e:
    print("REFUSED", e)
sys.stdout.flush()
sys.stdin.read()
"""


@pytest.mark.timeout(120)
def test_eight_processes_claiming_at_the_same_moment_one_wins(tmp_path: Path) -> None:
    start = time.time() + 5  # all started and waiting before the moment
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), str(start)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(8)
    ]
    outs = [p.stdout.readline() for p in procs]  # every outcome, with every racer (the winner too) alive
    for p in procs:
        p.communicate(timeout=30)
    assert sum(o.startswith("WON") for o in outs) == 1, outs
    assert sum(o.startswith("REFUSED run dir") for o in outs) == 7, outs
    assert not [p for p in tmp_path.iterdir() if p.name != lease.LEASE]  # no temporary files left
