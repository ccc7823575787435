"""The rank/world seam: torchrun variables, SLURM variables, half-set environments."""

from __future__ import annotations

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
