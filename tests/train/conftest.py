"""Helpers for training tests: real ranks started with torchrun on CPU (gloo), tiny configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, overrides: list[str], config: Path | None = SMOKE) -> list[str]:
    """The rank command; ``config=None`` trains the embedded defaults."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "pipeline.train", *(["--config", str(config)] if config else []), *overrides,
    ]  # fmt: skip


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def train(
    nproc: int,
    overrides: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    config: Path | None = SMOKE,
) -> subprocess.CompletedProcess:
    """Run the real entry point on ``nproc`` CPU ranks; output captured (stdout + stderr)."""
    return subprocess.run(
        torchrun_cmd(nproc, overrides, config), cwd=REPO, env=rank_env(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


def start_training(
    nproc: int, overrides: list[str], *, env: dict[str, str] | None = None, log: Path
) -> subprocess.Popen:
    """Start the ranks in their own process group (so a test can SIGKILL the whole job)."""
    return subprocess.Popen(
        torchrun_cmd(nproc, overrides), cwd=REPO, env=rank_env(env), stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank: torchrun starts each rank in a session of its own."""
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        try:
            rank.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(ranks, timeout=30)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records of <run_dir>/metrics.jsonl (a later line for a step wins: resumed runs)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], {}).update(record)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {s: m["train/loss"] for s, m in metrics(run_dir).items() if "train/loss" in m}


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"training failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"


def assert_same_state(a: object, b: object, where: str = "") -> None:
    """Two loaded checkpoint files hold the same thing: types, values, dtypes, and for each tensor its
    storage size, offset and strides (the layout DeepSpeed's readers see; legacy ``torch.save`` files
    differ in bytes between two saves of one object, as storages are keyed by their address)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), where
        assert a.requires_grad == b.requires_grad and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}/{i}")
    elif isinstance(a, np.ndarray):  # NumPy's generator state
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # e.g. DeepSpeed's loss scaler
        assert_same_state(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
