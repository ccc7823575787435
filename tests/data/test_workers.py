"""Loader workers (pipeline/data/workers.py) outlive SLURM's SIGTERM, and never keep their process from exiting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.config import DataConfig
from pipeline.data import build_loader

pytestmark = pytest.mark.timeout(60)


def _forkservers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]


def _workers() -> list[psutil.Process]:
    """The loader's workers: children of the forkserver, itself a child of this process."""
    return [w for server in _forkservers() for w in server.children()]


def test_workers_survive_sigterm_until_the_loader_closes(synthetic_shards: Path) -> None:
    cfg = DataConfig(path=str(synthetic_shards), num_workers=2, shuffle_buffer=16)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=8, image_size=(32, 32), seed=0)
    it = iter(loader)
    next(it)
    workers, servers = _workers(), _forkservers()
    assert len(workers) == 2 and len(servers) == 1
    for p in workers + servers:
        os.kill(p.pid, signal.SIGTERM)  # what SLURM sends every process of the job step
        os.kill(p.pid, signal.SIGUSR2)
    time.sleep(0.5)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers + servers)
    for _ in range(10):  # 1 + 10 batches: both workers keep serving
        images, labels = next(it)
        assert images.shape == (8, 3, 32, 32)
    loader.close()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive


SCRIPT = """
import sys
from pipeline.config import DataConfig
from pipeline.data import build_loader
loader = build_loader(DataConfig(path=sys.argv[1], num_workers=2), rank=0, world_size=1, batch_size=8,
                      image_size=(32, 32), seed=0)
it = iter(loader)
next(it)
raise RuntimeError("training failed with the workers still running")
"""


def test_a_failing_process_still_exits(synthetic_shards: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(synthetic_shards)], capture_output=True, text=True,
                          timeout=50)  # fmt: skip
    assert proc.returncode == 1 and "training failed with the workers still running" in proc.stderr
    assert time.monotonic() - t0 < 45


WAITING = """
import sys, time
from pipeline.config import DataConfig
from pipeline.data import build_loader
loader = build_loader(DataConfig(path=sys.argv[1], num_workers=2), rank=0, world_size=1, batch_size=8,
                      image_size=(32, 32), seed=0)
it = iter(loader)
next(it)
print("serving", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_process_leaves_no_helper_holding_its_output(synthetic_shards: Path) -> None:
    # torchrun SIGKILLs a rank that outlives its grace period; its workers, forkserver and resource
    # tracker used to live on, holding stdout open, so a caller waiting for the job's output hung.
    proc = subprocess.Popen([sys.executable, "-c", WAITING, str(synthetic_shards)], stdout=subprocess.PIPE, text=True)
    helpers: list[psutil.Process] = []
    try:
        assert proc.stdout.readline() == "serving\n"
        helpers = psutil.Process(proc.pid).children(recursive=True)
        kinds = sorted("forkserver" if "forkserver" in " ".join(p.cmdline()) else "tracker" for p in helpers)
        assert kinds.count("forkserver") == 3 and len(helpers) == 4  # server + 2 workers, resource tracker
        proc.kill()
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(helpers, timeout=15)
        assert [p.pid for p in alive] == []
        assert proc.stdout.read() == ""  # EOF: nobody holds the pipe any more
    finally:
        for p in [*helpers, psutil.Process(proc.pid)] if proc.poll() is None else helpers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_the_forkserver_preloads_the_streams_a_worker_runs() -> None:
    # The forkserver ignores a preload module it cannot import; a worker would then import the
    # stream's module at every start instead of in milliseconds, and nothing else would show it.
    probe = (
        "import importlib, sys\n"
        "from pipeline.data.workers import FORKSERVER_PRELOAD\n"
        "for name in FORKSERVER_PRELOAD: importlib.import_module(name)\n"
        "print(sorted(m for m in ('pipeline.data.train_stream', 'pipeline.data.val', 'pipeline.data.slots') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.split("\n")[-2] == "['pipeline.data.slots', 'pipeline.data.train_stream', 'pipeline.data.val']"
