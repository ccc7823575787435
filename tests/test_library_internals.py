"""The private parts of DeepSpeed, submitit and MLflow that the project touches, one function each.

Each test names the function that wraps the internal and fails with a message saying what changed in
the library, so that an upgrade breaks here, loudly, instead of silently somewhere in a job.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_submitit_renders_the_sbatch_script_with_the_function_its_executor_uses(tmp_path: Path) -> None:
    # launch/executor.py:sbatch_script (the --dry-run script) calls submitit's private _make_sbatch_string.
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    from launch.executor import LaunchPlan, sbatch_parameters
    from pipeline.config import LaunchConfig

    assert "_make_sbatch_string" in inspect.getsource(SlurmExecutor._make_submission_file_text), (
        "submitit's SlurmExecutor no longer writes its script with _make_sbatch_string: --dry-run would show "
        "a script other than the one submitted; update launch/executor.py:sbatch_script"
    )
    every = LaunchConfig(nodes=2, ranks_per_node=4, gpus_per_node=4, cpus_per_task=8, mem="64G", partition="p",
                         account="a", qos="q", constraint="c", exclude="n1")  # fmt: skip
    passed = set(sbatch_parameters(LaunchPlan("slurm", every, tmp_path, "t", sys.executable)))
    missing = ({"command", "folder"} | passed) - set(_params(_make_sbatch_string))
    assert len(passed) == 16  # every setting we pass, optional ones included
    assert not missing, f"submitit's _make_sbatch_string lost parameters {sorted(missing)}"


def test_deepspeed_zero3_gather_and_checkpoint_engine_have_the_calls_we_make() -> None:
    # engine.py:zero3_gathered_state_dict and engine.py:_recording (checksums of every file a save writes).
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    gather = getattr(DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict", None)
    assert gather is not None, (
        "DeepSpeedEngine._zero3_consolidated_16bit_state_dict is gone: update zero3_gathered_state_dict"
    )
    required = [p for p in inspect.signature(gather).parameters.values() if p.name != "self" and p.default is p.empty]
    assert not required, f"_zero3_consolidated_16bit_state_dict now needs {required}: update zero3_gathered_state_dict"
    assert "self.checkpoint_engine" in inspect.getsource(DeepSpeedEngine), (
        "DeepSpeedEngine no longer keeps its checkpoint engine in .checkpoint_engine: engine._recording sees no file"
    )
    assert list(_params(TorchCheckpointEngine.save))[1:] == ["state_dict", "path"], "checkpoint_engine.save changed"
    assert list(_params(TorchCheckpointEngine.load))[1:3] == ["path", "map_location"], "checkpoint_engine.load changed"


def test_mlflow_system_metrics_monitor_runs_and_stops_through_our_two_functions(tmp_path: Path) -> None:
    # tracking/backend.py:monitor_running and signal_monitor_stop, on a real monitor logging to a file store.
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from pipeline.tracking.backend import monitor_running, signal_monitor_stop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("internals"))
    monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=0.2, samples_before_logging=1, tracking_uri=uri)
    assert not monitor_running(monitor)
    monitor.start()
    deadline = time.monotonic() + 30
    while not client.get_run(run.info.run_id).data.metrics and time.monotonic() < deadline:
        time.sleep(0.2)
    assert monitor_running(monitor)
    assert any(k.startswith("system/") for k in client.get_run(run.info.run_id).data.metrics)
    signal_monitor_stop(monitor)
    stopper = threading.Thread(target=monitor.finish, daemon=True)
    stopper.start()
    stopper.join(15)
    assert not stopper.is_alive() and not monitor_running(monitor)


def test_deepspeed_builds_torch_fused_adamw_and_compiles_in_place() -> None:
    # engine.py:adamw_impl ("fused" rides DeepSpeed's torch_adam params into torch.optim.AdamW) and
    # engine.py:initialize (engine.compile() must compile the module in place: no "_orig_mod." keys).
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    params = {"torch_adam": True, "fused": True, "lr": 1e-3}
    cls, extra = DeepSpeedEngine.get_optimizer_configuration(None, params, True)
    assert cls is torch.optim.AdamW and params == {"fused": True, "lr": 1e-3}, (
        f"DeepSpeed's torch_adam now builds {cls} with {params} {extra}: update engine.py:adamw_impl"
    )
    assert "adam_optimizer(model_parameters, **optimizer_parameters" in inspect.getsource(
        DeepSpeedEngine._configure_basic_optimizer
    ), "DeepSpeed no longer passes the optimizer params through to torch's AdamW: update engine.py:adamw_impl"
    assert "self.module.compile(" in inspect.getsource(DeepSpeedEngine.compile), (
        "DeepSpeedEngine.compile no longer compiles its module in place: checkpoints of compiled runs could gain "
        "'_orig_mod.' keys; update engine.py:initialize"
    )
