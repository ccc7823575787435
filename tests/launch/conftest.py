"""Helpers for the launcher tests: run the real `launch/submit.py` as users do."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"
SLURM_SCRIPTS = REPO / "tests" / "slurm"


def run_launcher(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python launch/submit.py ARGS` from the repo root; ``env`` replaces the whole environment if given."""
    return subprocess.run(
        [sys.executable, str(SUBMIT), *args],
        cwd=REPO,
        env=os.environ.copy() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """configs/smoke.yaml on 2 nodes x 1 CPU rank, on the session's synthetic shards (4 classes)."""
    return [
        "--config", "configs/smoke.yaml", "--nodes", "2", "--run-dir", str(run_dir),
        f"data.path={data}", "model.num_classes=4", "launch.ranks_per_node=1", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_slurm_env(tmp_path: Path) -> dict[str, str]:
    """This environment on a machine whose SLURM does not answer: sbatch may exist, sinfo fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["SLURM_CONF"] = str(tmp_path / "no-such-slurm.conf")
    return env


# SLURM's client commands (Debian's slurm-client); no_sbatch_env leaves them out of PATH.
SLURM_TOOLS = frozenset(
    "sacct sacctmgr salloc sattach sbatch sbcast scancel scontrol scrontab sdiag sinfo sprio squeue sreport srun "
    "sshare sstat strigger sview".split()
)


@pytest.fixture
def no_sbatch_env(no_slurm_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A machine without SLURM's tools, whether or not this one has them: PATH is one directory of
    links to every program on this PATH except SLURM's. The compilers stay (DeepSpeed builds its
    CPU ops on first use), so the rank's build flags, and its op cache, match the other tests'."""
    shadow = tmp_path / "bin-without-slurm"
    shadow.mkdir()
    dirs = [Path(sys.executable).parent, *map(Path, os.environ.get("PATH", "").split(os.pathsep))]
    for d in filter(Path.is_dir, dirs):
        for prog in d.iterdir():
            link = shadow / prog.name
            if prog.name not in SLURM_TOOLS and not os.path.lexists(link) and os.access(prog, os.X_OK):
                link.symlink_to(prog)
    return {**no_slurm_env, "PATH": str(shadow)}


def rank_results(run_dir: Path, job_id: str, ranks: int) -> list:
    """Each rank's (outcome, TrainResult) as submitit pickled it at the end of the job."""
    folder = run_dir / "submitit" / job_id
    return [pickle.loads((folder / f"{job_id}_{r}_result.pkl").read_bytes()) for r in range(ranks)]


def submitted_job_id(stdout: str) -> str:
    """The job id from the launcher's "submitted <kind> job <id>: ..." line."""
    match = re.search(r"^submitted (?:slurm|local) job (\S+):", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment of a client of the local cluster (SLURM_CONF set); started here if needed, and
    stopped after the session (one start for every test module that uses the cluster)."""
    state = os.environ.get("PIPELINE_SLURM_DIR", "/tmp/pipeline-slurm")
    env = {**os.environ, "SLURM_CONF": f"{state}/etc/slurm.conf"}
    was_up = _answers(env)
    start = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start_local_slurm.sh")], env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if start.returncode != 0:
        reason = start.stderr.strip().splitlines()[-1] if start.stderr.strip() else "no output"
        if "could not install" in reason or "run as root" in reason:
            pytest.skip(f"no local SLURM: {reason}")
        pytest.fail(f"tests/slurm/start_local_slurm.sh failed: {start.stdout[-2000:]}\n{start.stderr[-2000:]}")
    yield env
    if not was_up:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_local_slurm.sh")], env=env, capture_output=True, timeout=120)
