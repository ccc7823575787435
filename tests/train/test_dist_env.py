"""The rank/world seam: torchrun variables, SLURM variables, half-set environments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.train.dist_env import DistEnvError, detect, first_host, port_for_job

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500"}  # fmt: skip
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]",
         "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*TORCHRUN, *SLURM, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed by us


def test_single_process_without_variables() -> None:
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")


def test_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 4, "n1", 29500)


def test_slurm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 2, "slurm")
    assert env.master_addr == "gpu07"
    assert env.master_port == port_for_job("123456") == 20000 + 123456 % 20000


def test_torchrun_wins_over_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**SLURM, **TORCHRUN}.items():
        monkeypatch.setenv(k, v)
    assert detect().source == "torchrun"


def test_half_set_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistEnvError, match=r"half-set torchrun environment: RANK, WORLD_SIZE set but LOCAL_RANK"):
        detect()


def test_half_set_slurm_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(DistEnvError, match=r"half-set SLURM environment: .* missing; run the ranks with srun"):
        detect()


def test_rank_outside_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**TORCHRUN, "RANK": "8"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistEnvError, match=r"rank 8 is outside world size 8"):
        detect()


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[07-10]", "gpu07"), ("a[3,5-6],b1", "a3"), ("x1,y[2-3]", "x1"), ("c[100]", "c100")],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


# --- the guard: rank and world size are read here and nowhere else in pipeline/ ----------------------

# Variables that say which rank this is or how many ranks/nodes there are (torchrun's, SLURM's, MPI's).
TOPOLOGY_VARS = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_STEP_NUM_NODES",
    "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
}  # fmt: skip


def _topology_names(source: str) -> set[str]:
    """Topology variable names ``source`` spells as a string (``os.environ["RANK"]``, ``env.get("SLURM_NNODES")``)."""
    return {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in TOPOLOGY_VARS
    }


def test_the_guard_sees_an_environment_read_of_the_world_size() -> None:
    src = 'import os\nworld = os.environ.get("WORLD_SIZE")\nnodes = env.get("SLURM_JOB_NUM_NODES", "1")\n'
    assert _topology_names(src) == {"WORLD_SIZE", "SLURM_JOB_NUM_NODES"}
    assert _topology_names('hook = "RANK@STEP"  # a test hook, not a variable\n') == set()


def test_only_dist_env_reads_rank_and_world_size_variables_in_pipeline() -> None:
    root = Path(__file__).resolve().parents[2]
    readers = {
        path.relative_to(root).as_posix(): sorted(names)
        for path in sorted((root / "pipeline").rglob("*.py"))
        if path.name != "dist_env.py" and (names := _topology_names(path.read_text()))
    }
    assert not readers, (
        f"rank/world variables read outside pipeline/train/dist_env.py: {readers}; take them from the "
        f"DistEnv that detect() returns (pass rank, world_size or num_nodes in as arguments)"
    )
