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
import torch

from pipeline.config import Config, TrackingConfig, config_to_dict, flatten, load_config
from pipeline.model import ViT
from pipeline.tracking import (
    find_run,
    open_tracker,
    pretrain_tags,
    run_name_for,
    ui_compare_url,
    ui_run_url,
    ui_runs_url,
)
from pipeline.tracking.datasets import split_inputs
from pipeline.tracking.tags import SOURCE_ENV, source_name, source_tags
from pipeline.train.export import write_export
from tests.fixtures.mlflow_models import assert_run_model
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
    finetunes: dict[str, str]  # fine-tune run name -> run id, one per smoke run (same order)


SOURCE = source_name("python -m pipeline.train", "configs/smoke.yaml")
# The shard index the smoke runs read, as the engine describes it (train/lifecycle.py).
DATASET = split_inputs(
    name="synthetic", source="/data/synthetic", train_split="train", val_split="val", num_classes=10,
    splits={"train": ("0123456789abcdef", 512), "val": ("fedcba9876543210", 64)},
)  # fmt: skip


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
            tracking, run_dir=run_dir, experiment="smoke", run_name=name, params=flatten(cfg),
            tags={"zero_stage": "2", **source_tags({"USER": "smoke-user", SOURCE_ENV: SOURCE})},
        )  # fmt: skip
        for step in range(1, 11):
            tracker.log_metrics({"train/loss": 2.5 - step * float(lr) * 50, "train/img_per_s": 800.0 + step}, step)
            tracker.log_metrics({"train/mfu": 0.25}, step)
        tracker.log_metrics({"eval/top1": top1, "eval/loss": 1.0 / top1}, 10)
        tracker.log_datasets(DATASET)
        if not run_dirs:  # the first run also carries its export as an MLflow model, as a finished run does
            tracker.log_model(_tiny_export(cfg, run_dir / "export", tracker.run_id))
        tracker.close()
        run_dirs.append(run_dir)
        names.append(name)
        run_ids.append(tracker.run_id)
    return SmokeRuns(mlflow_server, run_dirs, names, run_ids, find_run(run_dirs[0]).experiment_id,
                     _finetunes(mlflow_server, root, run_dirs))  # fmt: skip


def _tiny_export(cfg: Config, out: Path, run_id: str | None) -> Path:
    torch.manual_seed(0)
    state = ViT(**cfg.model.vit_kwargs()).state_dict()
    return write_export(state, config_to_dict(cfg.model), out, step=10, source="final", run_id=run_id,
                        data=config_to_dict(cfg.data))  # fmt: skip


def _finetunes(server: MlflowTestServer, root: Path, pretrain_dirs: list[Path]) -> dict[str, str]:
    """A fine-tune of each smoke run, tagged as the fine-tune stage tags it (the pretrain link, the
    step dir loaded), logging ``eval/best_top1`` as finetune/best.py does. Made in the order that
    MLflow's default (newest first) is not the order by best top-1."""
    out = {}
    for pretrain_dir, best in zip(pretrain_dirs, (0.75, 0.875), strict=True):
        name = f"ft-{pretrain_dir.name}"
        step_dir = pretrain_dir / "checkpoints" / "step_00000010"
        tracker = open_tracker(
            TrackingConfig(uri=server.url, system_metrics=False), run_dir=root / name, experiment="smoke",
            run_name=name, tags=pretrain_tags(pretrain_dir, loaded=step_dir, step=10),
        )  # fmt: skip
        for step, top1 in ((20, best - 0.125), (40, best)):
            tracker.log_metrics({"eval/top1": top1, "eval/best_top1": top1}, step)
        tracker.close()
        out[name] = tracker.run_id
    return out


def test_runs_carry_their_dataset_and_fine_tunes_link_their_pretrain_run(smoke_runs: SmokeRuns) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(smoke_runs.server.url)
    inputs = client.get_run(smoke_runs.run_ids[0]).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs) == [
        ("synthetic", "0123456789abcdef", "training"), ("synthetic", "fedcba9876543210", "evaluation"),
    ]  # fmt: skip
    ft = client.get_run(smoke_runs.finetunes[f"ft-{smoke_runs.names[0]}"])
    step_dir = str(smoke_runs.run_dirs[0] / "checkpoints" / "step_00000010")
    assert ft.data.tags["pretrain.run_id"] == smoke_runs.run_ids[0]
    assert ft.data.tags["pretrain.step_dir"] == ft.data.tags["pretrain.checkpoint"] == step_dir
    link = f"[{smoke_runs.names[0]}](#/experiments/{smoke_runs.experiment_id}/runs/{smoke_runs.run_ids[0]}?"
    assert link in ft.data.tags["mlflow.note.content"]
    assert ft.data.metrics["eval/best_top1"] == 0.75
    # The first run's export is its MLflow model (listed in its outputs, predicting the export's logits).
    assert_run_model(smoke_runs.server.url, smoke_runs.run_ids[0], smoke_runs.run_dirs[0] / "export")
    kind = client.get_experiment(smoke_runs.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"


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


@pytest.mark.browser
@pytest.mark.timeout(300)  # four page loads and a new tab on a loaded 2-core machine (the fixture's runs too)
def test_mlflow_ui_sorts_by_best_top1_shows_the_dataset_and_opens_the_pretrain_run(
    smoke_runs: SmokeRuns, chromium: str
) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    base, exp = smoke_runs.server.url, smoke_runs.experiment_id
    by_best = ui_runs_url(base, exp) + "&orderByKey=metrics.%60eval%2Fbest_top1%60&orderByAsc=false"
    ft_names = list(smoke_runs.finetunes)  # made in this order; best top-1 0.75, then 0.875
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(by_best)
            rows = [page.get_by_text(name, exact=True).first for name in ft_names]
            for row in rows:
                row.wait_for(state="visible", timeout=60_000)
            first, second = (row.bounding_box()["y"] for row in rows)
            assert second < first, "sorted by eval/best_top1 (descending), the 0.875 fine-tune comes first"
            # The model-training view (not GenAI's traces and judges): its sidebar has the model registry.
            assert page.get_by_text("Model registry", exact=True).first.is_visible()
            assert page.get_by_text("Judges", exact=True).count() == 0
            page.screenshot(path=ARTIFACTS / "mlflow_runs_by_best_top1.png")

            page.goto(ui_run_url(base, exp, smoke_runs.run_ids[0]))
            page.get_by_text(smoke_runs.names[0], exact=True).first.wait_for(state="visible", timeout=60_000)
            page.get_by_text("synthetic", exact=False).first.wait_for(state="visible", timeout=60_000)
            body = page.inner_text("body")
            assert re.search(r"synthetic \(0123456789abcdef\)\s*Training", body), "the train split's dataset input"
            assert re.search(r"Source\s*python -m pipeline\.train --config\s+configs/smoke\.yaml", body)
            assert re.search(r"Created by\s*smoke-user", body)
            # A run with a logged model gets MLflow 3's "Logged models (N)" table (loaded after the details).
            page.screenshot(path=ARTIFACTS / "mlflow_run_dataset.png")
            logged = page.get_by_text("Logged models (1)", exact=True).first
            logged.wait_for(state="visible", timeout=60_000)
            logged.scroll_into_view_if_needed()
            page.screenshot(path=ARTIFACTS / "mlflow_run_logged_model.png")

            ft_id = smoke_runs.finetunes[ft_names[0]]
            page.goto(ui_run_url(base, exp, ft_id))
            link = page.get_by_role("link", name=smoke_runs.names[0], exact=True).first
            link.wait_for(state="visible", timeout=60_000)
            page.screenshot(path=ARTIFACTS / "mlflow_finetune_note.png")
            # The UI's markdown opens links in a new tab; either way the pretrain run's page must come up.
            with page.context.expect_page(timeout=60_000) as opened:
                link.click()
            pretrain = opened.value
            pretrain.set_viewport_size({"width": 1600, "height": 1000})
            pretrain.get_by_text(smoke_runs.run_ids[0]).first.wait_for(state="visible", timeout=60_000)
            assert f"/runs/{smoke_runs.run_ids[0]}" in pretrain.url
            assert pretrain.get_by_text(smoke_runs.names[0], exact=True).first.is_visible()
            pretrain.screenshot(path=ARTIFACTS / "mlflow_pretrain_from_link.png")
        finally:
            browser.close()
