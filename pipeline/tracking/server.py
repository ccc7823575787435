"""Start and stop an MLflow tracking server (used by ``launch/mlflow_server.py`` and the tests).

The server runs as ``python -m mlflow server`` in its own process group, so this module does
not import mlflow. Defaults follow what was measured: one worker (4 workers take 15-23 s and
3 GB to start, one ~7 s and 0.5 GB), job execution off, bound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.durable import atomic_write, atomic_write_via
from pipeline.tracking.uris import sqlite_uri

log = logging.getLogger(__name__)

SERVER_URL_FILE = Path("runs/mlflow/server_url")  # where jobs (launch/submit.py) find the server
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSpec:
    """What to start. Files under ``root``: mlflow.db, artifacts/, server.log, server.pid, auth files."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 5000
    backend_uri: str = ""  # "": SQLite under root; e.g. postgresql://user@db/mlflow for many writers
    artifacts: str = ""  # "": root/artifacts
    workers: int = 1
    job_execution: bool = False
    auth: bool = False  # basic auth; the admin password comes from $MLFLOW_AUTH_ADMIN_PASSWORD
    allowed_hosts: str = ""  # extra Host header patterns (comma-separated) besides this host's names

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def url(self) -> str:
        """The URL clients use: the bind address, or this host's name when bound to all interfaces."""
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "server.pid"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri or sqlite_uri(self.root / "mlflow.db"),
            "--artifacts-destination", self.artifacts or str(self.root / "artifacts"),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        if self.host not in LOOPBACK:
            cmd += ["--allowed-hosts", self._allowed_hosts()]
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def _allowed_hosts(self) -> str:
        """Jobs reach the server by this host's name (the URL file); a tunnel arrives as localhost."""
        names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
        if self.host not in ("0.0.0.0", "::"):
            names.add(self.host)
        patterns = sorted(names) + [f"{n}:*" for n in sorted(names)]
        extra = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        return ",".join(patterns + extra)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if self.job_execution else "false"
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if self.auth:
            env.update(self._auth_env(env))
        return env

    def _auth_env(self, env: dict[str, str]) -> dict[str, str]:
        auth_db = self.root / "basic_auth.db"
        if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD") and not auth_db.exists():
            raise ValueError(
                "basic auth needs the admin password in the environment: export MLFLOW_AUTH_ADMIN_PASSWORD=... "
                "(there is no default password; MLFLOW_AUTH_ADMIN_USERNAME sets the user, default 'admin')"
            )
        ini = self.root / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {sqlite_uri(auth_db)}\n"
            f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": self._secret_key(env)}

    def _secret_key(self, env: dict[str, str]) -> str:
        """Flask's session key: the environment's, else one kept (mode 600) under root across restarts."""
        if env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            return env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
        path = self.root / "flask_secret_key"
        key = path.read_text().strip() if path.exists() else ""
        if not key:  # none yet (an empty file is a crash's leftover from before the durable write)

            def write(tmp: Path) -> None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))

            atomic_write_via(path, write)
            key = path.read_text().strip()
        return key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def start_server(spec: ServerSpec, *, wait_s: float = 120.0) -> subprocess.Popen:
    """Start the server detached (its own session) and wait until ``/health`` answers."""
    spec.root.mkdir(parents=True, exist_ok=True)
    health_url = f"http://{'127.0.0.1' if spec.host in ('0.0.0.0', '::') else spec.host}:{spec.port}"
    if is_healthy(health_url, 1.0):
        raise RuntimeError(f"port {spec.port} already serves MLflow at {health_url}; stop it or pick another --port")
    env = spec.env()
    with open(spec.log_file, "ab") as logf:
        proc = subprocess.Popen(
            spec.command(), env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
    spec.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while not is_healthy(health_url, 1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc.pid)
            tail = spec.log_file.read_text(errors="replace")[-3000:]
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not up after {wait_s:.0f} s"
            raise RuntimeError(f"mlflow server {why}; log {spec.log_file}:\n{tail}")
        time.sleep(0.25)
    return proc


def stop_server(pid: int, *, timeout_s: float = 15.0, kill: bool = False) -> bool:
    """Stop the server's process group: SIGTERM (SIGKILL with ``kill``, or after ``timeout_s``).

    Returns False if no such process was running.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    os.killpg(pgid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            _reap(pid)
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    _reap(pid)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    _reap(pgid)  # a dead child of ours stays a zombie (and "alive") until reaped
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def write_url_file(path: Path, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, url + "\n")


def read_server_url(path: str | Path | None = None) -> str | None:
    """The URL written by ``launch/mlflow_server.py start`` (``None`` when no server was started)."""
    path = Path(path) if path else SERVER_URL_FILE
    try:
        url = path.read_text().strip()
    except OSError:
        return None
    return url or None
