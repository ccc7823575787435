"""The run's model in MLflow: an export saved as an MLflow PyTorch model, logged to the run, and
registered in the Model Registry on request (``tracking.register_as``).

Two halves, on the two sides of the tracker:

- ``build_mlflow_model`` (the caller's side, at the end of a run): ``<export>/mlflow_model``, an
  MLflow model folder of the export's weights. It is written in the run dir, so a record naming it
  survives a down server in the write-ahead log like any artifact, and is replayed later.
- ``deliver_model`` (the delivery thread): that folder becomes a LoggedModel named ``model`` whose
  source run is this run (so ``mlflow.pytorch.load_model("runs:/<run_id>/model")`` finds it, and the
  run page lists it under "Logged models"), then, when asked, a version of a registered model
  tagged with the run's headline metrics. A replay or a second finish of the same export creates
  neither twice (the export's step is the key).

Flavour: ``mlflow.pytorch`` with the module pickled, plus a copy of ``pipeline.model`` (torch and
einops only) as the model's code, so it loads where this repository is not installed. MLflow's
default outside Databricks, "pt2" (``torch.export``), fixes the batch size to an input example's
and stores that example as JSON (megabytes for one 224 px image); the pickle takes any batch.

What it predicts: ``load_model(...)(x)`` and the pyfunc's ``predict(x)`` take float32 images
(B, C, H, W), already resized, centre-cropped and normalised as the export's ``config.json``
(``pretrained_cfg``: input size, mean, std, crop fraction) says, and return logits (B, num_classes),
the same as ``pipeline.model.ViT`` with the export's weights.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pytorch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline import metric_names as mn
from pipeline.artifacts.exports import load_export
from pipeline.durable import fsync_path
from pipeline.tracking.state import Record

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the artifact path: runs:/<run_id>/model
FOLDER = "mlflow_model"  # <export>/mlflow_model
KEY_TAG = "pipeline.export_key"  # on the LoggedModel and the model version: which export it is
_PIPELINE = Path(__file__).resolve().parents[1]


def build_mlflow_model(export_dir: Path) -> tuple[Path, dict]:
    """``export_dir``/mlflow_model from the export (reused when already built from the same step);
    returns the folder and the export's model.json."""
    import einops
    import torch

    from pipeline.model import ViT

    state, meta = load_export(export_dir)
    out = Path(export_dir) / FOLDER
    if _built_step(out) == meta.get("step"):
        return out, meta  # e.g. a finished run started again: its buffered record may be uploading it
    allowed = inspect.signature(ViT).parameters
    model = ViT(**{k: v for k, v in meta["model"].items() if k in allowed}).eval()
    model.load_state_dict(state, strict=True)
    channels, (h, w) = model.init_kwargs["channels"], _pair(model.init_kwargs["image_size"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(_np_float32(), (-1, channels, h, w))]),
        outputs=Schema([TensorSpec(_np_float32(), (-1, model.init_kwargs["num_classes"]))]),
    )
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".mlflow_model.") as tmp, _no_pickle_warning():
        staged = Path(tmp) / FOLDER
        mlflow.pytorch.save_model(
            model, str(staged), serialization_format="pickle", code_paths=[str(_model_code(Path(tmp)))],
            signature=signature, metadata={"export_step": meta.get("step"), "export_source": meta.get("source")},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"einops=={einops.__version__}"],
        )  # fmt: skip
        for f in staged.rglob("*"):
            if f.is_file():
                fsync_path(f)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # a whole folder swapped in: a reader sees the old one, the new one or none
    fsync_path(out.parent)
    return out, meta


class _PickleWarning(logging.Filter):
    """MLflow warns at every pickled save that unpickling runs code; the choice is made and explained
    in this module's doc, and a warning at the end of every run would only be noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _no_pickle_warning() -> Iterator[None]:
    logger, quiet = logging.getLogger("mlflow.pytorch"), _PickleWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _np_float32() -> Any:
    import numpy as np

    return np.dtype(np.float32)


def _pair(size: int | list | tuple) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _model_code(tmp: Path) -> Path:
    """A ``pipeline`` package holding only ``pipeline.model`` (torch and einops only): the pickled
    module refers to ``pipeline.model.vit.ViT``, and this copy resolves it without the repository."""
    pkg = tmp / "code" / "pipeline"
    shutil.copytree(_PIPELINE / "model", pkg / "model", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__init__.py").write_text('"""pipeline.model only: the code of an MLflow model of this project."""\n')
    return pkg


def _built_step(folder: Path) -> Any:
    if not (folder / "MLmodel").is_file():
        return None
    try:
        return (Model.load(str(folder)).metadata or {}).get("export_step")
    except Exception:  # a folder from an older or broken build: rebuilt
        return None


def headline(records: list[Record], best_top1: float | None) -> dict[str, float]:
    """The run's headline numbers from its metric records: the last eval/top1 and eval/loss, and the
    best top-1 (``best_top1`` when the caller kept it, else the largest eval/top1 logged)."""
    last: dict[str, tuple[int, float]] = {}
    tops = []
    for r in records:
        for key in (mn.EVAL_TOP1, mn.EVAL_LOSS):
            if key in r["v"] and r["step"] >= last.get(key, (-1, 0.0))[0]:
                last[key] = (r["step"], float(r["v"][key]))
        if mn.EVAL_TOP1 in r["v"]:
            tops.append(float(r["v"][mn.EVAL_TOP1]))
    out = {k: v for k, (_, v) in last.items()}
    best = best_top1 if best_top1 is not None else max(tops, default=None)
    if best is not None:
        out["best_top1"] = float(best)
    return out


def model_record(folder: Path, meta: dict, *, register_as: str, metrics: dict[str, float], run_name: str) -> Record:
    """The write-ahead-log record that ``deliver_model`` sends."""
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return {
        "t": "model",
        "path": str(Path(folder).resolve()),
        "name": MODEL_NAME,
        "key": f"step{meta.get('step')}",
        "step": int(meta.get("step") or 0),
        "register": register_as,
        "tags": {KEY_TAG: f"step{meta.get('step')}", "export_source": str(meta.get("source", ""))[:500],
                 **{k: f"{v:.6g}" for k, v in metrics.items()}},
        "description": f"run {run_name}, step {meta.get('step')} ({meta.get('source', 'export')}): {shown}",
    }  # fmt: skip


def deliver_model(client: Any, run_id: str, record: Record) -> None:
    """Log ``record``'s folder as the run's model and register it when asked; raises on failure.
    Each part is skipped when an earlier delivery of the same export got that far."""
    folder = Path(record["path"])
    if not (folder / "MLmodel").is_file():
        from pipeline.tracking.backend import Rejected

        raise Rejected(f"MLflow model {folder} no longer exists")
    experiment_id = client.get_run(run_id).info.experiment_id
    model = _logged(client, experiment_id, run_id, record)
    if model is None:
        model = client.create_logged_model(
            experiment_id, name=record["name"], source_run_id=run_id, tags=record["tags"], model_type="pytorch"
        )
        client.log_model_artifacts(model.model_id, str(folder))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, record["step"])])
        log.info("tracking: logged the MLflow model %s (%s) of run %s", model.model_id, record["key"], run_id)
    if record.get("register"):
        _register(client, record, run_id, model)


def _logged(client: Any, experiment_id: str, run_id: str, record: Record) -> Any:
    """This run's READY model of this export, if an earlier delivery made it; a model an
    interrupted delivery left half uploaded is deleted (loading by run would find it first)."""
    found = None
    for m in _run_models(client, experiment_id, run_id, record["name"]):
        if m.tags.get(KEY_TAG) == record["key"] and m.status == LoggedModelStatus.READY:
            found = found or m
        elif m.status != LoggedModelStatus.READY:
            client.delete_logged_model(m.model_id)
    return found


def _run_models(client: Any, experiment_id: str, run_id: str, name: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"name = '{name}'", page_token=token)
        out += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            return out


def _register(client: Any, record: Record, run_id: str, model: Any) -> None:
    name = record["register"]
    try:
        client.create_registered_model(name, description="registered by the training pipeline (tracking.register_as)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for v in client.search_model_versions(f"run_id = '{run_id}'"):
        if v.name == name and v.tags.get(KEY_TAG) == record["key"]:
            return  # registered by an earlier delivery of this export
    # The source is the model's storage location, not "models:/<id>": a local (SQLite) registry
    # resolves that URI through the process's global tracking URI, not this client's (MLflow 3.x).
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags=record["tags"],
        description=record["description"], model_id=model.model_id,
        await_creation_for=0,  # a server's registry creates it at once; never wait here
    )  # fmt: skip
    log.info("tracking: registered %s version %s (%s)", name, version.version, record["description"])
