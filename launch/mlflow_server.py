"""Run an MLflow tracking server for a cluster (on a login node) or a laptop.

    python launch/mlflow_server.py start                     # 127.0.0.1:5000, SQLite under runs/mlflow
    python launch/mlflow_server.py start --host $(hostname) --auth   # reachable from compute nodes
    python launch/mlflow_server.py status
    python launch/mlflow_server.py stop
    python launch/mlflow_server.py start --backend-uri sqlite:///$PWD/runs/mlflow.db   # browse local runs

``start`` writes the server's URL to ``runs/mlflow/server_url`` (``--url-file``), where
``launch/submit.py`` picks it up for the jobs it submits. Defaults: SQLite (``--backend-uri``
for a database), one worker, job execution off, bound to 127.0.0.1. ``--auth`` turns on basic
auth with the admin password from ``$MLFLOW_AUTH_ADMIN_PASSWORD`` (there is no default).
"""

from __future__ import annotations

import argparse
import getpass
import signal
import socket
import sys
from pathlib import Path

from pipeline.tracking.server import (
    SERVER_URL_FILE,
    ServerSpec,
    is_healthy,
    read_server_url,
    start_server,
    stop_server,
    write_url_file,
)

DEFAULT_ROOT = SERVER_URL_FILE.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a server and write its URL file")
    start.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="store, artifacts, log and pid (%(default)s)")
    start.add_argument("--host", default="127.0.0.1", help="interface to bind (%(default)s); a hostname for jobs")
    start.add_argument("--port", type=int, default=5000)
    start.add_argument("--backend-uri", default="", help="database URI (default: SQLite under --root)")
    start.add_argument("--artifacts", default="", help="artifact directory or URI (default: --root/artifacts)")
    start.add_argument("--workers", type=int, default=1, help="server worker processes (%(default)s)")
    start.add_argument("--enable-jobs", action="store_true", help="turn MLflow's job execution on (off by default)")
    start.add_argument("--auth", action="store_true", help="basic auth; password from $MLFLOW_AUTH_ADMIN_PASSWORD")
    start.add_argument("--allowed-hosts", default="", help="extra Host header patterns, comma-separated")
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C or SIGTERM stops the server")
    for sp in (start, sub.add_parser("stop", help="stop the server"), sub.add_parser("status", help="is it up?")):
        if sp is not start:
            sp.add_argument("--root", type=Path, default=DEFAULT_ROOT)
        sp.add_argument("--url-file", type=Path, default=None, help="default: <root>/server_url")
    return p


def cmd_start(args: argparse.Namespace) -> int:
    spec = ServerSpec(
        root=args.root,
        host=args.host,
        port=args.port,
        backend_uri=args.backend_uri,
        artifacts=args.artifacts,
        workers=args.workers,
        job_execution=args.enable_jobs,
        auth=args.auth,
        allowed_hosts=args.allowed_hosts,
    )
    url_file = args.url_file or spec.root / "server_url"
    try:
        proc = start_server(spec)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_url_file(url_file, spec.url)
    _print_usage(spec, url_file)
    if spec.host not in ("127.0.0.1", "localhost", "::1") and not spec.auth:
        print(f"warning: {spec.url} accepts anyone who can reach {spec.host}; consider --auth", file=sys.stderr)
    if not args.foreground:
        return 0

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        proc.wait()
        print(f"mlflow server exited with {proc.returncode}; log: {spec.log_file}", file=sys.stderr)
        return proc.returncode or 1
    except KeyboardInterrupt:
        stop_server(proc.pid)
        return 0
    finally:
        url_file.unlink(missing_ok=True)
        spec.pid_file.unlink(missing_ok=True)


def _print_usage(spec: ServerSpec, url_file: Path) -> None:
    print(f"MLflow server: {spec.url} (pid {spec.pid_file.read_text().strip()}, log {spec.log_file})")
    print(f"URL written to {url_file}; launch/submit.py passes it to jobs, or: export MLFLOW_TRACKING_URI={spec.url}")
    if spec.auth:
        print("jobs log in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    host = socket.getfqdn()
    print(f"UI from your laptop: ssh -N -L {spec.port}:{_tunnel_target(spec)}:{spec.port} {getpass.getuser()}@{host}")
    print(f"  then open http://localhost:{spec.port}")


def _tunnel_target(spec: ServerSpec) -> str:
    return "127.0.0.1" if spec.host in ("127.0.0.1", "localhost", "0.0.0.0") else spec.host


def cmd_stop(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    url_file = args.url_file or root / "server_url"
    pid_file = root / "server.pid"
    if not pid_file.exists():
        print(f"no server recorded under {root} (no server.pid)", file=sys.stderr)
        url_file.unlink(missing_ok=True)
        return 1
    pid = int(pid_file.read_text().strip())
    stopped = stop_server(pid)
    pid_file.unlink(missing_ok=True)
    url_file.unlink(missing_ok=True)
    print(f"stopped mlflow server (pid {pid})" if stopped else f"pid {pid} was not running; cleaned up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    url = read_server_url(args.url_file or root / "server_url")
    if url and is_healthy(url):
        print(f"up: {url}")
        return 0
    print(f"down (url file: {url or 'none'})")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
