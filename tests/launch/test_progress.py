"""launch/progress.py: --status of a running job (step, loss, img/s, ETA, links) and --follow's summary.

The run dir is written the way the ranks write it (metrics.jsonl, config.yaml, tracking.json, job.json);
the "running local job" is a live process of this test, which is what the local executor's job id is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import progress
from pipeline.config import load_config, save_config
from tests.launch.conftest import run_launcher


def _run_dir(tmp_path: Path, records: list[dict], *, steps: int = 100, job_id: str = "1") -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "submitit" / job_id).mkdir(parents=True)
    save_config(load_config("configs/smoke.yaml", [f"train.steps={steps}"]), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    job = {
        "job_id": job_id,
        "executor": "local",
        "nodes": 1,
        "tasks_per_node": 2,
        "folder": str(run_dir / "submitit" / job_id),
    }
    attempt = {"job_id": job_id, "restart": 0, "started": "2026-12-02T10:00:00+0000"}
    (run_dir / "job.json").write_text(
        json.dumps({"jobs": [job], "attempts": [attempt], "name": "smoke", "requeues": 0})
    )
    return run_dir


def _train(step: int, t: float, loss: float) -> dict:
    return {"step": step, "time": t, "train/loss": loss, "train/img_per_s": 320.0}


def test_progress_reads_step_loss_rate_and_eta_from_the_newest_records(tmp_path: Path) -> None:
    # 2 s per step over the newest records; an earlier slow start (first steps: warm-up) is outside the window.
    records = [_train(1, 1000.0, 2.0)] + [_train(s, 1100.0 + 2.0 * s, 1.0 - s / 100) for s in range(5, 55, 5)]
    records.append({"step": 50, "time": 1200.5, "eval/top1": 0.25, "eval/loss": 1.2})
    records.insert(5, {"step": 25, "time": 1150.5, "eval/top1": 0.375})
    p = progress.read_progress(_run_dir(tmp_path, records))
    assert p is not None
    assert (p.step, p.total, p.loss, p.img_per_s) == (50, 100, 0.5, 320.0)
    assert p.eta_s == pytest.approx(100.0)  # 50 steps left x 2 s
    assert (p.last_top1, p.best_top1) == (0.25, 0.375)
    line = progress.progress_line(p)
    assert line == "step 50/100, loss 0.5000, 320.0 img/s, ETA 1m40s, eval top-1 0.2500 (best 0.3750)"


def test_a_resume_starts_a_new_rate_span(tmp_path: Path) -> None:
    # Attempt 1 ran steps 10-40 at 1 s/step; the resume went back to step 30 and runs at 3 s/step.
    records = [_train(s, 100.0 + s, 1.0) for s in (10, 20, 30, 40)]
    records += [_train(s, 5000.0 + 3.0 * s, 1.0) for s in (30, 40, 50)]
    p = progress.read_progress(_run_dir(tmp_path, records))
    assert p is not None and p.step == 50 and p.eta_s == pytest.approx(50 * 3.0)


def test_status_of_a_running_job_shows_step_eta_log_and_run(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        records = [_train(s, 1000.0 + 0.5 * s, 2.0 - s / 100) for s in (10, 20, 30)]
        run_dir = _run_dir(tmp_path, records, steps=200, job_id=str(sleeper.pid))
        (run_dir / "tracking.json").write_text(
            json.dumps({"run_id": "abc123", "experiment_id": "7", "tracking_uri": "http://127.0.0.1:5999"})
        )
        out = run_launcher(["--status", str(run_dir)])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"job {sleeper.pid} (local, 1 node(s) x 2 tasks): RUNNING" in out.stdout
    # 170 steps left at 0.5 s per step.
    assert "progress: step 30/200, loss 1.7000, 320.0 img/s, ETA 1m25s" in out.stdout
    assert "MLflow run: http://127.0.0.1:5999/#/experiments/7/runs/abc123?workflowType=machine_learning" in out.stdout
    assert f"rank 0 log: {run_dir / 'submitit' / str(sleeper.pid) / f'{sleeper.pid}_0_log.out'}" in out.stdout


def test_the_follow_summary_names_results_export_run_and_time(tmp_path: Path) -> None:
    records = [_train(s, 1000.0 + s, 1.0 / s) for s in (10, 20)] + [{"step": 20, "time": 1021.0, "eval/top1": 0.75}]
    run_dir = _run_dir(tmp_path, records, steps=20)
    (run_dir / "export" / "best").mkdir(parents=True)
    (run_dir / "export" / "best" / "model.safetensors").write_bytes(b"x")
    data = json.loads((run_dir / "job.json").read_text())
    data["attempts"][0]["ended"] = "2026-12-02T11:02:03+0000"
    data["requeues"] = 1
    (run_dir / "tracking.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": "sqlite:///x/mlflow.db"}))
    assert progress.summary_lines(run_dir, data) == [
        "reached step 20/20, last train loss 0.0500",
        "eval top-1: final 0.7500, best 0.7500",
        f"export: {run_dir / 'export' / 'best'}",
        "MLflow run: run r1 in sqlite:///x/mlflow.db (browse it with launch/mlflow_server.py, or "
        "`mlflow ui --backend-store-uri sqlite:///x/mlflow.db`)",
        "took 1h02m03s over 1 attempt(s), 1 requeue(s)",
    ]
