"""What can be known wrong before a job is queued is refused at submit, naming the fix: fine-tune
weights that are not there or of another architecture, a tracking server that refuses the
credentials or does not answer, credentials inside the tracking URI (never written anywhere)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import config_to_dict, load_config
from pipeline.model import ViT
from pipeline.tracking import find_run, metric_history
from pipeline.tracking.server import ServerSpec, free_port
from pipeline.train.export import write_export
from tests.fixtures.mlflow_server import MlflowTestServer
from tests.launch.conftest import REPO, run_launcher, smoke_args

pytestmark = pytest.mark.timeout(180)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MLFLOW_TRACKING_"))}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _refused(out: subprocess.CompletedProcess, run_dir: Path, rc: int = 1) -> str:
    assert out.returncode == rc, out.stdout + out.stderr
    assert not (run_dir / "job.json").exists() and not (run_dir / "submitit").exists()
    return out.stderr


def test_finetune_init_from_pointing_at_nothing_is_refused(tmp_path: Path, synthetic_shards: Path) -> None:
    run_dir, missing = tmp_path / "ft", tmp_path / "no-such-pretrain"
    args = smoke_args(synthetic_shards, run_dir, "--local", f"finetune.init_from={missing}", "finetune.num_classes=4")
    err = _refused(run_launcher(args, env=_env()), run_dir)
    assert f"finetune.init_from='{missing}' does not exist; point it at a pretrain run dir" in err
    assert "nothing was submitted" in err


def test_finetune_from_weights_of_another_architecture_is_refused(tmp_path: Path, synthetic_shards: Path) -> None:
    # A real export of a smoke-sized ViT (dim 48, depth 2) ...
    pretrain = load_config(REPO / "configs" / "smoke.yaml")
    state = ViT(**pretrain.model.vit_kwargs()).state_dict()
    export = write_export(
        state, config_to_dict(pretrain.model), tmp_path / "export", step=30, source="test", run_id=None
    )
    run_dir = tmp_path / "ft"
    common = [f"finetune.init_from={export}", "finetune.num_classes=4", "--local"]
    # ... into a model of depth 3 and width 64: refused before anything is queued, key by key.
    args = smoke_args(synthetic_shards, run_dir, *common, "model.depth=3", "model.dim=64")
    err = _refused(run_launcher(args, env=_env()), run_dir)
    assert f"the pretrained model at {export} has another architecture" in err
    assert "model.dim: pretrained 48 vs config 64; model.depth: pretrained 2 vs config 3" in err
    assert "Set these model.* keys to the pretrained values" in err
    # The matching architecture passes that check.
    ok = run_launcher([*smoke_args(synthetic_shards, run_dir, *common), "--dry-run"], env=_env())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok: finetune: init from {export} (step 30), same backbone architecture as model.*" in ok.stdout


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowTestServer, str]]:
    """A real MLflow server with basic auth (admin password from the environment, as in production)."""
    password = secrets.token_urlsafe(12)
    old = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    try:
        # Started as start_mlflow_server does, with a longer wait: the auth app starts slowly under load.
        spec = ServerSpec(root=tmp_path_factory.mktemp("auth_server"), host="127.0.0.1", port=free_port(), auth=True)
        server = MlflowTestServer(spec)
        server.start(wait_s=300)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
        else:
            os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = old
    try:
        yield server, password
    finally:
        server.stop()


def test_a_tracking_server_refusing_the_credentials_is_refused_at_submit(
    tmp_path: Path, synthetic_shards: Path, auth_server: tuple[MlflowTestServer, str]
) -> None:
    server, password = auth_server
    run_dir = tmp_path / "run"
    args = smoke_args(synthetic_shards, run_dir, "--local", f"tracking.uri={server.url}")
    wrong = _env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong-" + password)
    err = _refused(run_launcher(args, env=wrong), run_dir)
    assert (
        f"error: the tracking server {server.url} refused the credentials (HTTP 401): export the right "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it (now: user admin)"
    ) in err
    err = _refused(run_launcher(args, env=_env()), run_dir)  # no credentials at all
    assert "refused the credentials (HTTP 401)" in err and "(now: user not set)" in err
    right = _env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    ok = run_launcher([*args, "--dry-run"], env=right)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok: tracking: {server.url} answers and accepts these credentials" in ok.stdout
    assert password not in ok.stdout + ok.stderr


def test_an_unreachable_tracking_server_is_refused_at_submit(tmp_path: Path, synthetic_shards: Path) -> None:
    run_dir, url = tmp_path / "run", f"http://127.0.0.1:{free_port()}"
    err = _refused(
        run_launcher(smoke_args(synthetic_shards, run_dir, "--local", f"tracking.uri={url}"), env=_env()), run_dir
    )
    assert f"error: the tracking server {url} does not answer (Connection refused): start it " in err
    assert "or turn tracking off (tracking.enabled=false)" in err


def _files_containing(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_credentials_inside_the_tracking_uri_are_refused_and_written_nowhere(
    tmp_path: Path, synthetic_shards: Path
) -> None:
    secret, port = "s3cret-" + secrets.token_hex(4), free_port()
    run_dir = tmp_path / "run"
    uri = f"http://alice:{secret}@127.0.0.1:{port}"
    fix = (
        f"has credentials in it, which would be written in plain text to job.json, config.yaml, tracking.json, "
        f"the checkpoints and the logs; remove them from the URI (http://127.0.0.1:{port}) and export "
        f"MLFLOW_TRACKING_USERNAME=alice and MLFLOW_TRACKING_PASSWORD=... in the environment"
    )
    # In the config (an override here): refused while the config loads, by the launcher ...
    for extra in ([], ["--dry-run"]):
        out = run_launcher(
            [*smoke_args(synthetic_shards, run_dir, "--local", f"tracking.uri={uri}"), *extra], env=_env()
        )
        err = _refused(out, run_dir, rc=2)
        assert f"tracking.uri='http://alice:***@127.0.0.1:{port}' {fix}" in err
        assert secret not in out.stdout + out.stderr
    # ... and by the rank entry point (torchrun, srun) before anything is written.
    rank = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", "configs/smoke.yaml", f"train.run_dir={run_dir}",
         f"tracking.uri={uri}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rank.returncode == 2 and fix in rank.stderr and secret not in rank.stdout + rank.stderr
    # In the environment: refused at submit, naming the variable.
    out = run_launcher(smoke_args(synthetic_shards, run_dir, "--local"), env=_env(MLFLOW_TRACKING_URI=uri))
    err = _refused(out, run_dir)
    assert f"MLFLOW_TRACKING_URI='http://alice:***@127.0.0.1:{port}' {fix}" in err
    assert secret not in out.stdout + out.stderr
    assert _files_containing(tmp_path, secret) == []


@pytest.mark.timeout(900)
def test_a_run_whose_metrics_never_reached_the_server_does_not_end_as_a_plain_success(
    tmp_path: Path, synthetic_shards: Path, auth_server: tuple[MlflowTestServer, str]
) -> None:
    from tests.train.conftest import assert_ok, losses, train

    server, password = auth_server
    run_dir = tmp_path / "run"
    args = [
        f"data.path={synthetic_shards}", f"train.run_dir={run_dir}", "train.steps=10", "train.log_every=1",
        "checkpoint.every_steps=5", f"tracking.uri={server.url}", "tracking.timeout_s=2", "tracking.max_retries=0",
        "tracking.retry_s=1", "tracking.system_metrics=false",
    ]  # fmt: skip
    # The password went wrong after submission (rotated): straight to the ranks, as srun would start them.
    wrong = train(
        2, args, env={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "rotated"}, timeout=600
    )
    assert wrong.returncode != 0, wrong.stdout[-4000:]  # rank 0 exits 4: trained, metrics not delivered
    assert f"never reached {server.url}; they stay in {run_dir / 'tracking_buffer.jsonl'}" in wrong.stdout
    buffered = [json.loads(line) for line in (run_dir / "tracking_buffer.jsonl").read_text().splitlines()]
    assert [r["step"] for r in buffered if r["t"] == "m" and "train/loss" in r["v"]] == list(range(1, 11))
    for secret in (password, "rotated"):
        assert _files_containing(tmp_path, secret) == []  # not in config.yaml, trainer_state.json, buffer, logs

    # With the right password the next start of the (complete) run delivers everything and succeeds.
    creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    right = train(2, [*args, "tracking.timeout_s=30"], env=creds, timeout=600)  # patient on a loaded machine
    assert_ok(right)
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    try:
        run = find_run(run_dir)
        history = metric_history(run.tracking_uri, run.run_id, "train/loss")
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert history == sorted(losses(run_dir).items())
    assert not (run_dir / "tracking_buffer.jsonl").exists()
