"""``launch/mlflow_server.py``: the command it builds, and a real start/stop with basic auth."""

from __future__ import annotations

import base64
import os
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import find_run, open_tracker, read_server_url
from pipeline.tracking.server import ServerSpec, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "mlflow_server.py"


def test_server_command_defaults_to_one_worker_loopback_and_no_jobs(tmp_path: Path) -> None:
    spec = ServerSpec(root=tmp_path, port=5123)
    cmd = spec.command()
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")
    assert "--app-name" not in cmd and "--allowed-hosts" not in cmd
    assert spec.env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert ServerSpec(root=tmp_path, job_execution=True).env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
    cluster = ServerSpec(root=tmp_path, host="0.0.0.0", backend_uri="postgresql://db/mlflow", workers=4)
    cmd = cluster.command()
    assert cmd[cmd.index("--backend-store-uri") + 1] == "postgresql://db/mlflow"
    assert "localhost:*" in cmd[cmd.index("--allowed-hosts") + 1].split(",")


def test_auth_without_a_password_in_the_environment_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    out = _cli(["start", "--root", str(tmp_path), "--port", str(free_port()), "--auth"], env)
    assert out.returncode == 1
    assert "export MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr and "no default password" in out.stderr
    assert not (tmp_path / "server.pid").exists()


@pytest.mark.timeout(120)
def test_cli_starts_a_basic_auth_server_clients_log_with_credentials_and_stop_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, port = tmp_path / "server", free_port()
    password = secrets.token_urlsafe(16)
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    started = _cli(["start", "--root", str(root), "--port", str(port), "--auth"], env)
    try:
        assert started.returncode == 0, started.stderr
        url = read_server_url(root / "server_url")
        assert url == f"http://127.0.0.1:{port}"
        assert f"ssh -N -L {port}:127.0.0.1:{port}" in started.stdout

        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(api) == 401
        assert _status(api, ("admin", "wrong-" + password)) == 401
        assert _status(api, ("admin", password)) == 200

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        cfg = TrackingConfig(uri=url, timeout_s=5.0, max_retries=0, system_metrics=False)
        tracker = open_tracker(cfg, run_dir=tmp_path / "run", experiment="auth", run_name="authed")
        tracker.log_metrics({"eval/top1": 0.5}, 1)
        tracker.close()
        assert find_run(tmp_path / "run").metrics == {"eval/top1": 0.5}
        assert _cli(["status", "--root", str(root)], env).stdout.startswith("up: ")
    finally:
        stopped = _cli(["stop", "--root", str(root)], env)
    assert stopped.returncode == 0 and "stopped mlflow server" in stopped.stdout
    assert not (root / "server_url").exists() and not (root / "server.pid").exists()
    assert _status(f"http://127.0.0.1:{port}/health") == -1  # nothing listens any more
    assert _cli(["status", "--root", str(root)], env).returncode == 1


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=100
    )


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def test_the_flask_secret_key_is_private_and_an_empty_leftover_is_replaced(tmp_path: Path) -> None:
    spec = ServerSpec(root=tmp_path, port=1)
    (tmp_path / "flask_secret_key").write_text("")  # what a crash between create and write used to leave
    key = spec._secret_key({})
    assert len(key) == 64 and int(key, 16) >= 0
    assert stat.S_IMODE((tmp_path / "flask_secret_key").stat().st_mode) == 0o600
    assert spec._secret_key({}) == key  # kept across restarts
