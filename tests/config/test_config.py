"""Strict config loading: defaults, overrides, types, unknown keys, cross-field checks, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_diff,
    dump_config,
    flatten,
    load_config,
    save_config,
)
from pipeline.tracking import experiment_for
from pipeline.train.batch import plan_batch

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_local_job() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.launch.world_size == 2 and cfg.train.device == "auto"
    plan = plan_batch(cfg.train, cfg.world_size)
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (32, 1, 64)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(REPO / "configs").as_posix() for p in SHIPPED])
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert dump_config(load_config(out)) == dump_config(cfg)


def test_pretrain_b16_batch_arithmetic() -> None:
    cfg = load_config(REPO / "configs/pretrain/vit_b16.yaml")
    assert (cfg.model.dim, cfg.model.depth, cfg.model.heads, cfg.model.mlp_dim) == (768, 12, 12, 3072)
    assert plan_batch(cfg.train, 64).grad_accum == 1  # 64 per GPU x 8 GPUs x 8 nodes = 4096
    assert plan_batch(cfg.train, 32).grad_accum == 2  # the same recipe on 4 nodes
    assert experiment_for(cfg) == "pretrain" and cfg.name == "vit_b16"


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 3e-4\n")  # YAML 1.1 reads 3e-4 as a string
    cfg = load_config(path, ["optim.lr=1e-3", "model.depth=6", "data.mean=[0.5,0.5,0.5]", "train.zero_stage=3"])
    assert cfg.optim.lr == 1e-3 and cfg.model.depth == 6 and cfg.train.zero_stage == 3
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert load_config(path).optim.lr == 3e-4


def test_preset_fills_only_what_the_file_leaves_open(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  preset: S/16\n  image_size: 224\n  depth: 6\n")
    m = load_config(path).model
    assert (m.dim, m.depth, m.heads, m.mlp_dim, m.patch_size, m.qkv_bias) == (384, 6, 6, 1536, 16, True)


def test_only_differences_are_written() -> None:
    cfg = load_config(None, ["optim.lr=0.002", "train.steps=7"])
    assert config_diff(cfg) == {"optim": {"lr": 0.002}, "train": {"steps": 7}}
    assert flatten(cfg)["optim.lr"] == 0.002 and flatten(cfg)["model.dim"] == 64


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("optim:\n  lrr: 1\n", [], r"x\.yaml: unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?"),
        ("modle:\n  dim: 3\n", [], r"unknown config key 'modle'; did you mean 'model'\?"),
        (
            "",
            ["train.zero_stag=1"],
            r"override 'train\.zero_stag=1': unknown config key 'train\.zero_stag'; did you mean",
        ),
        ("", ["train.zero_stage=two"], r"override 'train\.zero_stage=two': config key 'train\.zero_stage' expects int"),
        ("train:\n  steps: 1.5\n", [], r"x\.yaml: config key 'train\.steps' expects int, got 1\.5"),
        ("model:\n  qkv_bias: 1\n", [], r"config key 'model\.qkv_bias' expects bool"),
        ("model:\n  pool: max\n", [], r"'model\.pool' must be one of 'cls', 'mean', got 'max'"),
        (
            "model:\n  image_size: 30\n",
            [],
            r"image_size 30 is not divisible by model\.patch_size 4.*model\.image_size=28",
        ),
        ("model:\n  preset: B/15\n", [], r"unknown model\.preset 'B/15'; did you mean 'B/16'\?"),
        ("train:\n  zero_stage: 4\n", [], r"train\.zero_stage must be 0, 1, 2 or 3, got 4"),
        (
            "train:\n  zero_stage: 3\n",
            ["train.compile=true"],
            r"train\.compile=true does not work with train\.zero_stage=3: ZeRO-3 gathers .* use train\.zero_stage=2",
        ),
        ("train:\n  global_batch_size: 100\n", [], r"global_batch_size=100 is not a multiple of .* \(= 64\)"),
        ("train:\n  global_batch_size: 128\n  grad_accum: 3\n", [], r"global_batch_size=128 != .*grad_accum=3"),
        ("finetune:\n  init_from: runs/x\n", [], r"finetune\.num_classes is missing"),
        (
            "finetune:\n  init_from: runs/x\n  num_classes: 5\nmodel:\n  num_classes: 7\n",
            [],
            r"model\.num_classes=7 conflicts with finetune\.num_classes=5.*drop model\.num_classes",
        ),
        ("data:\n  mean: [0.5, 0.5]\n", [], r"'data\.mean' expects 3 values"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        ("", ["optim.lr"], r"not of the form section\.key=value"),
        ("", ["optim.lr.x=1"], r"'optim\.lr' is a value, not a section"),
    ],
)
def test_bad_input_is_refused_with_the_fix(tmp_path: Path, text: str, overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"config file nope\.yaml does not exist"):
        load_config("nope.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_recompute_modes_and_the_older_checkpointing_switch() -> None:
    assert load_config(None, []).model.recompute_mode == "none"
    assert load_config(None, ["model.grad_checkpointing=true"]).model.recompute_mode == "full"
    both = load_config(None, ["model.grad_checkpointing=true", "model.recompute=full"])
    assert both.model.recompute_mode == "full"
    k = load_config(None, ["model.recompute=every_k", "model.recompute_every=3"]).model
    assert (k.recompute_mode, k.recompute_every, "recompute" in k.vit_kwargs()) == ("every_k", 3, False)
    with pytest.raises(ConfigError, match=r"'model\.recompute' must be one of 'none', 'full', 'selective', 'every_k'"):
        load_config(None, ["model.recompute=some"])
    with pytest.raises(ConfigError, match=r"model\.recompute_every must be >= 1, got 0"):
        load_config(None, ["model.recompute=every_k", "model.recompute_every=0"])
    with pytest.raises(ConfigError, match=r"grad_checkpointing=true means model\.recompute=full.*'selective'"):
        load_config(None, ["model.grad_checkpointing=true", "model.recompute=selective"])
    with pytest.raises(ConfigError, match=r"model\.recompute='some'; use one of none, full, selective, every_k"):
        ModelConfig(recompute="some")  # type: ignore[arg-type]


def test_finetune_head_fills_an_unset_model_num_classes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "finetune:\n  init_from: runs/x\n  num_classes: 5\n"))
    assert cfg.model.num_classes == 5 and cfg.head_key == "finetune.num_classes"
    same = load_config(write(tmp_path, "finetune:\n  init_from: runs/x\n  num_classes: 5\nmodel:\n  num_classes: 5\n"))
    assert same == cfg


def test_run_dir_defaults_to_the_config_name(tmp_path: Path) -> None:
    assert Config().train.run_dir == "runs/default"
    assert load_config(write(tmp_path, "", name="vit_x.yaml")).train.run_dir == "runs/vit_x"
    assert load_config(write(tmp_path, "train:\n  run_dir: elsewhere\n")).train.run_dir == "elsewhere"


def test_absolute_paths_and_defaults_are_resolved_before_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "train:\n", name="job.yaml")  # an empty section is a section
    cfg = load_config(path, ["finetune.init_from=pre", "finetune.num_classes=3"], absolute_paths=True)
    # The default run dir is named by the recipe overrides too (pipeline/config/recipe.py).
    assert cfg.train.run_dir == str(tmp_path / "runs" / "job-from_pre-num_classes3")
    assert cfg.data.path == str(tmp_path / "runs" / "data" / "synthetic")
    assert cfg.finetune.init_from == str(tmp_path / "pre") and cfg.launch.container == ""
    # A URL stays as written, so the refusal quotes it.
    with pytest.raises(ConfigError, match=r"data\.path 's3://b/x': the s3: scheme"):
        load_config(path, ["data.path=s3://b/x"], absolute_paths=True)
    # Defaults fill only what the file and the overrides leave unset, and are validated like them.
    url = "http://127.0.0.1:5999"
    assert load_config(path, defaults={"tracking.uri": url}).tracking.uri == url
    assert load_config(path, ["tracking.uri=http://h:1"], defaults={"tracking.uri": url}).tracking.uri == "http://h:1"
    with pytest.raises(ConfigError, match=r"tracking\.uri=.*has credentials in it"):
        load_config(path, defaults={"tracking.uri": "http://u:pw@h:1"})
