"""Comparing runs: two smoke runs with different LRs on a real server, the compare CLI, and the
MLflow UI in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig, flatten, load_config
from pipeline.tracking import find_run, open_tracker, run_name_for, ui_compare_url, ui_runs_url
from tests.fixtures.mlflow_server import MlflowTestServer

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.timeout(120)


@dataclass
class SmokeRuns:
    server: MlflowTestServer
    run_dirs: list[Path]
    names: list[str]
    run_ids: list[str]
    experiment_id: str


@pytest.fixture(scope="module")
def smoke_runs(mlflow_server: MlflowTestServer, tmp_path_factory: pytest.TempPathFactory) -> SmokeRuns:
    """Two short runs of one config that differ only in optim.lr, as the engine would log them."""
    root = tmp_path_factory.mktemp("runs")
    run_dirs, names, run_ids = [], [], []
    for lr, top1 in (("1e-3", 0.625), ("3e-4", 0.5)):
        overrides = [f"optim.lr={lr}", "train.zero_stage=2", f"train.run_dir={root}/{lr}"]
        cfg = load_config(None, [*overrides, "name=vit_tiny"])
        name = run_name_for(cfg, overrides)
        tracking = TrackingConfig(uri=mlflow_server.url, system_metrics=False)
        run_dir = root / name
        tracker = open_tracker(
            tracking, run_dir=run_dir, experiment="smoke", run_name=name, params=flatten(cfg), tags={"zero_stage": "2"}
        )
        for step in range(1, 11):
            tracker.log_metrics({"train/loss": 2.5 - step * float(lr) * 50, "train/img_per_s": 800.0 + step}, step)
            tracker.log_metrics({"train/mfu": 0.25}, step)
        tracker.log_metrics({"eval/top1": top1, "eval/loss": 1.0 / top1}, 10)
        tracker.close()
        run_dirs.append(run_dir)
        names.append(name)
        run_ids.append(tracker.run_id)
    return SmokeRuns(mlflow_server, run_dirs, names, run_ids, find_run(run_dirs[0]).experiment_id)


def test_smoke_runs_are_named_from_their_overrides(smoke_runs: SmokeRuns) -> None:
    assert smoke_runs.names == ["vit_tiny-lr1e-3-zero2", "vit_tiny-lr3e-4-zero2"]


def test_compare_cli_prints_differing_params_final_metrics_and_the_ui_link(smoke_runs: SmokeRuns) -> None:
    out = subprocess.run(
        [sys.executable, "launch/compare.py", *map(str, smoke_runs.run_dirs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    print(out.stdout)
    assert lines[0].split() == ["run", *smoke_runs.names]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.strip() and not line.startswith("MLflow")}
    assert rows["optim.lr"] == ["0.001", "0.0003"]
    assert rows["train.run_dir"][0].endswith("/1e-3")  # it differs too, so it is shown
    assert "train.zero_stage" not in rows and "model.dim" not in rows  # equal: hidden by default
    assert rows["eval/top1"] == ["0.625", "0.5"]
    assert rows["train/img_per_s"] == ["810", "810"] and rows["train/mfu"] == ["0.25", "0.25"]
    url = ui_compare_url(smoke_runs.server.url, smoke_runs.run_ids, [smoke_runs.experiment_id])
    assert f"MLflow UI compare page: {url}" in lines

    everything = subprocess.run(
        [sys.executable, "launch/compare.py", "--all", *map(str, smoke_runs.run_dirs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(r"^train\.zero_stage\s+2\s+2$", everything.stdout, re.M), everything.stdout


def test_compare_cli_names_a_bad_argument(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "launch/compare.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert f"{tmp_path} has no tracking.json with a run id" in out.stderr


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed by tests/system/install_browser.sh when missing."""
    path = shutil.which("chromium")
    if path is None:
        script = REPO / "tests" / "system" / "install_browser.sh"
        out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        path = shutil.which("chromium")
        if path is None:
            said = (out.stdout + out.stderr)[-500:]
            pytest.skip(f"chromium could not be installed ({script} exited {out.returncode}: {said})")
    return path


@pytest.mark.browser
def test_mlflow_ui_shows_both_runs_and_the_compare_page(smoke_runs: SmokeRuns, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    base = smoke_runs.server.url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(ui_runs_url(base, smoke_runs.experiment_id))
            for name in smoke_runs.names:
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=60_000)
            page.screenshot(path=ARTIFACTS / "mlflow_runs.png")

            page.goto(ui_compare_url(base, smoke_runs.run_ids, [smoke_runs.experiment_id]))
            page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for(state="visible", timeout=60_000)
            for name in smoke_runs.names:
                assert page.get_by_text(name, exact=True).first.is_visible()
            lr_row = page.get_by_text("optim.lr", exact=True).last
            lr_row.scroll_into_view_if_needed()
            assert lr_row.is_visible()
            top1 = page.get_by_text("eval/top1", exact=True).last
            top1.scroll_into_view_if_needed()
            assert top1.is_visible()
            body = page.inner_text("body")
            assert re.search(r"optim\.lr\s+0\.001\s+0\.0003", body), "the differing LR row is missing"
            assert re.search(r"eval/top1[\s\S]*0\.625[\s\S]*0\.5", body), "the eval/top1 metric row is missing"
            # Only the differing params, then the LR row and the metrics in one picture.
            page.get_by_text("Show diff only").first.click()
            lr_row.scroll_into_view_if_needed()
            assert page.get_by_text("train.zero_stage", exact=True).count() == 0  # equal params hidden
            shot = ARTIFACTS / "mlflow_compare.png"
            page.screenshot(path=shot)
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    print(f"screenshots: {shot} and {ARTIFACTS / 'mlflow_runs.png'}")
