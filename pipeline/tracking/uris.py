"""Where runs are tracked and where to look at them: tracking URIs and MLflow UI links.

Pure functions over the config and the environment (no mlflow import), so the launcher and the
compare CLI can use them cheaply.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

from pipeline.config.schema import ConfigError, TrackingConfig, refuse_uri_credentials

_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def default_tracking_uri(tracking: TrackingConfig, run_dir: str | Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir parent>/mlflow.db``.

    The local store sits beside the run directories, so every run under one root shares one
    store (and one ``mlflow ui``) with no server.
    """
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return sqlite_uri(Path(run_dir).resolve().parent / "mlflow.db")


def sqlite_uri(db_file: str | Path) -> str:
    """``sqlite:////abs/path.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + str(Path(db_file).resolve())


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_uri(uri: str, tracking: TrackingConfig) -> None:
    """Refuse a URI MLflow cannot use, or one with credentials in it, naming where it came from."""
    source = "tracking.uri" if tracking.uri else "MLFLOW_TRACKING_URI"
    refuse_uri_credentials(uri, source)
    scheme = uri.partition("://")[0].partition("+")[0] if "://" in uri else ""
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{source}={uri!r} is not a tracking URI MLflow can use; give http://host:port (a server), "
            f"sqlite:////abs/path/mlflow.db (a local store) or a database URI ({', '.join(_SCHEMES)})"
        )


# MLflow 3.17's UI shows an experiment in its GenAI view (traces, judges) unless the URL asks for
# model training; the choice then sticks in the browser. The experiment tag mlflow.experimentKind
# (tracking/tags.py) says the same to UIs that read it.
UI_TRAINING_VIEW = "workflowType=machine_learning"


def ui_runs_url(base_url: str, experiment_id: str) -> str:
    """The runs table of one experiment (``#/experiments/<id>`` alone opens an overview page)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_TRAINING_VIEW}"


def ui_run_path(experiment_id: str, run_id: str) -> str:
    """A run's page relative to the UI (a link in a run's description opens it in the same UI)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_TRAINING_VIEW}"


def ui_run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/{ui_run_path(experiment_id, run_id)}"


def ui_compare_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's compare page: ``#/compare-runs?runs=[...]&experiments=[...]`` (URL-encoded JSON)."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps(sorted(set(experiment_ids)), separators=(",", ":")))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"
