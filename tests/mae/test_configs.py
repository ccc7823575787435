"""The shipped MAE configs: MAE's recipe and its arithmetic, and the tiny local pair fits the demo's models."""

from __future__ import annotations

from launch.memory_plan import format_plan, memory_plan
from pipeline.config import load_config
from pipeline.stages import stage_for
from pipeline.train.batch import plan_batch
from tests.train.conftest import REPO

IMAGENET = 1_281_167


def test_pretrain_b16_is_maes_recipe() -> None:
    cfg = load_config(REPO / "configs/pretrain/mae_vit_b16.yaml")
    assert type(stage_for(cfg)).__name__ == "MAEPretraining"
    t, o, m = cfg.train, cfg.optim, cfg.mae
    assert plan_batch(t, 64).global_batch_size == 4096 and plan_batch(t, 64).grad_accum == 1
    assert t.steps == round(IMAGENET * 1600 / 4096) and o.warmup_steps == round(IMAGENET * 40 / 4096)
    assert o.lr == 1.5e-4 * 4096 / 256 and o.betas == (0.9, 0.95) and o.weight_decay == 0.05 and o.min_lr == 0
    assert (m.mask_ratio, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.norm_pix_loss) == (0.75, 512, 8, 16, True)
    assert cfg.data.mixup_alpha == 0 and cfg.data.label_smoothing == 0
    plan = format_plan(memory_plan(cfg, nodes=8, gpus_per_node=8))
    assert "the encoder sees 50 of 197 tokens" in plan


def test_finetune_b16_is_maes_recipe_on_the_pretrain_run() -> None:
    cfg = load_config(REPO / "configs/finetune/mae_vit_b16.yaml")
    ft, t, o = cfg.finetune, cfg.train, cfg.optim
    assert ft.init_from.endswith("runs/mae_vit_b16") and ft.layer_decay == 0.65 and ft.num_classes == 1000
    assert cfg.model.pool == "mean" and cfg.model.drop_path_rate == 0.1
    assert (cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.label_smoothing) == (0.8, 1.0, 0.1)
    assert plan_batch(t, 16).global_batch_size == 1024 and o.lr == 5e-4 * 1024 / 256
    assert t.steps == round(IMAGENET * 100 / 1024) and o.warmup_steps == round(IMAGENET * 5 / 1024)


def test_tiny_pair_runs_on_the_demo_machine() -> None:
    pre = load_config(REPO / "configs/pretrain/mae_tiny.yaml")
    ft = load_config(REPO / "configs/finetune/mae_tiny.yaml")
    digits = load_config(REPO / "configs/finetune/digits.yaml")
    assert pre.train.objective == "mae" and pre.model == load_config(None).model  # the demo's tiny ViT
    assert ft.finetune.init_from.endswith(pre.train.run_dir) and ft.model.pool == "mean"
    assert (ft.train.steps, ft.optim.lr, ft.data.path) == (digits.train.steps, digits.optim.lr, digits.data.path)
