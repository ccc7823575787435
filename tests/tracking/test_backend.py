"""Request planning of the MLflow writes (tracking/backend.py): a pure function, no store."""

from __future__ import annotations

from pipeline.tracking.backend import MAX_METRICS, MAX_PARAMS_TAGS, plan_requests


def test_plan_requests_respects_mlflow_batch_limits_and_order() -> None:
    metrics = [{"t": "m", "step": s, "ts": 0, "v": {f"k{i}": 1.0 for i in range(300)}} for s in range(5)]
    params = {"t": "p", "v": {f"p{i}": "x" for i in range(250)}}
    artifact = {"t": "a", "path": "/x", "dir": None}
    groups = plan_requests([*metrics[:2], params, artifact, *metrics[2:]])
    flat = [r for g in groups for r in g]
    assert [r["t"] for r in flat] == ["m", "m", "p", "p", "p", "a", "m", "m", "m"]
    for g in groups:
        assert sum(len(r["v"]) for r in g if r["t"] == "m") <= MAX_METRICS
        assert sum(len(r["v"]) for r in g if r["t"] == "p") <= MAX_PARAMS_TAGS
        assert sum(len(r.get("v", {})) for r in g) <= MAX_METRICS
    assert sum(len(r["v"]) for r in flat if r["t"] == "p") == 250
    assert [len(g) for g in groups if g[0]["t"] == "m"] == [2, 3]  # 600 and 900 metrics per request
