"""An export as an MLflow model: built in the run dir, logged to the run, registered on request.

The training runs that do this end to end are in tests/train/test_tracking_e2e.py (pretraining,
the server killed mid-run) and tests/finetune/test_finetune.py (the best fine-tune).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_model_name

from pipeline.config import ConfigError, ModelConfig, TrackingConfig
from pipeline.model import ViT
from pipeline.tracking.backend import Store
from pipeline.tracking.models import build_mlflow_model, headline, model_record
from pipeline.train.export import write_export
from tests.fixtures.mlflow_models import assert_run_model, export_logits

pytestmark = pytest.mark.timeout(180)


def _export(out: Path) -> Path:
    cfg = asdict(ModelConfig(image_size=32, patch_size=8, dim=48, depth=2, heads=3, dim_head=16, mlp_dim=96,
                             num_classes=5, qkv_bias=True, layer_norm_eps=1e-6))  # fmt: skip
    torch.manual_seed(0)
    model = ViT(**{k: v for k, v in cfg.items() if k not in ("preset", "grad_checkpointing", "recompute",
                                                             "recompute_every")})  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return write_export(model.state_dict(), cfg, out, step=7, source="test", run_id=None)


def test_built_model_predicts_the_exports_logits_and_is_reused(tmp_path: Path) -> None:
    export = _export(tmp_path / "export")
    old = os.umask(0o022)
    try:
        folder, meta = build_mlflow_model(export)
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in [folder, *folder.rglob("*")])  # teammates read it
    assert folder == export / "mlflow_model" and meta["step"] == 7
    assert (folder / "code" / "pipeline" / "model" / "vit.py").is_file()
    assert not (folder / "code" / "pipeline" / "tracking").exists()  # the model's code only
    images = torch.randn(6, 3, 32, 32)
    want = export_logits(export, images)
    loaded = mlflow.pytorch.load_model(str(folder))
    with torch.no_grad():
        assert (loaded(images) - want).abs().max().item() <= 1e-5
    pyfunc = mlflow.pyfunc.load_model(str(folder))
    assert np.abs(np.asarray(pyfunc.predict(images.numpy())) - want.numpy()).max() <= 1e-5
    assert pyfunc.metadata.signature.inputs.inputs[0].shape == (-1, 3, 32, 32)
    assert pyfunc.metadata.signature.outputs.inputs[0].shape == (-1, 5)
    mtime = (folder / "MLmodel").stat().st_mtime_ns
    assert build_mlflow_model(export)[0] == folder and (folder / "MLmodel").stat().st_mtime_ns == mtime


def test_headline_takes_the_last_eval_and_the_best_top1() -> None:
    records = [
        {"t": "m", "step": 10, "v": {"eval/top1": 0.5, "eval/loss": 1.0}},
        {"t": "m", "step": 20, "v": {"eval/top1": 0.7, "eval/loss": 0.8, "train/loss": 0.1}},
        {"t": "m", "step": 30, "v": {"eval/top1": 0.6, "eval/loss": 0.9}},
    ]
    assert headline(records, None) == {"eval/top1": 0.6, "eval/loss": 0.9, "best_top1": 0.7}
    assert headline(records, 0.75)["best_top1"] == 0.75
    assert headline([], None) == {}


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_logged_once_loadable_by_run_and_registered_with_the_metrics(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local store's registry once resolved the model through the global tracking URI (a new
    # ./mlflow.db in the working directory) and failed: run from an empty directory to see that.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = request.getfixturevalue("mlflow_server").url if store == "server" else f"sqlite:///{tmp_path}/mlflow.db"
    export = _export(tmp_path / "export")
    folder, meta = build_mlflow_model(export)
    client = MlflowClient(uri)
    exp = Store(uri).experiment_id(f"models-{tmp_path.name}")  # a local store's artifacts beside its database
    run_id = client.create_run(exp, run_name="unit").info.run_id
    metrics = {"eval/top1": 0.625, "eval/loss": 1.25, "best_top1": 0.75}
    record = model_record(folder, meta, register_as=f"vit-{tmp_path.name}", metrics=metrics, run_name="unit")
    writer = Store(uri)
    writer.deliver(run_id, [record])
    writer.deliver(run_id, [record])  # a replay of the same export: nothing twice

    v = assert_run_model(uri, run_id, export, register_as=f"vit-{tmp_path.name}")
    assert len(client.search_model_versions(f"name = 'vit-{tmp_path.name}'")) == 1
    assert {k: v.tags[k] for k in metrics} == {"eval/top1": "0.625", "eval/loss": "1.25", "best_top1": "0.75"}
    assert "eval/top1 0.6250" in v.description and "run unit, step 7" in v.description
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_half_uploaded_model_of_an_interrupted_delivery_is_replaced(mlflow_server, tmp_path: Path) -> None:
    export = _export(tmp_path / "export")
    folder, meta = build_mlflow_model(export)
    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment(f"models-{tmp_path.name}")
    run_id = client.create_run(exp, run_name="unit").info.run_id
    record = model_record(folder, meta, register_as="", metrics={}, run_name="unit")
    # What a delivery killed between creating the model and finishing its upload leaves behind.
    client.create_logged_model(exp, name="model", source_run_id=run_id, tags=record["tags"])
    Store(mlflow_server.url).deliver(run_id, [record])
    assert assert_run_model(mlflow_server.url, run_id, export) is None


@pytest.mark.parametrize("name", ["my-model", "vit b/16", "a:b", "", "  ", ".", "..x", "x/..", "ok.name"])
def test_register_as_follows_mlflows_rules(name: str) -> None:
    try:
        _validate_model_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    if not name:  # "" means "do not register"
        assert TrackingConfig(register_as=name).register_as == ""
        return
    if mlflow_ok:
        assert TrackingConfig(register_as=name).register_as == name
        return
    with pytest.raises(ConfigError, match=r"tracking\.register_as=.*e\.g\. tracking\.register_as=") as e:
        TrackingConfig(register_as=name)
    suggested = str(e.value).rsplit("tracking.register_as=", 1)[1]
    _validate_model_name(suggested)  # the suggestion is a valid name
