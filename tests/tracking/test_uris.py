"""Tracking URIs and MLflow UI links (tracking/uris.py): pure functions, no store."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import default_tracking_uri, ui_compare_url, ui_runs_url


def test_default_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "a"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(TrackingConfig(), run_dir) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri(TrackingConfig(), run_dir) == "http://127.0.0.1:5999"
    assert default_tracking_uri(TrackingConfig(uri="http://127.0.0.1:6000"), run_dir) == "http://127.0.0.1:6000"


def test_ui_urls() -> None:
    url = ui_compare_url("http://localhost:5000/", ["r1", "r2"], ["7", "7"])
    assert url.startswith("http://localhost:5000/#/compare-runs?runs=")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ["r1", "r2"]
    assert json.loads(query["experiments"][0]) == ["7"]
    assert ui_runs_url("http://h:1", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
