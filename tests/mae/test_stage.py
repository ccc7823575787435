"""MAE as a stage: picked by the config, masks keyed by batch identity, labels unused, the head frozen,
and the config refusals (no DeepSpeed, no ranks)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.mae.stage import MAEPretraining, mask_generator
from pipeline.model.mae import MaskedAutoencoder, random_masking
from pipeline.stages import stage_for
from pipeline.train.stage import Classification, pretraining

MAE = ["train.objective=mae", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=4"]


def mask_for(seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
    return random_masking(8, 64, 0.75, mask_generator(seed, rank, step, micro, 0x3A5E))[2]


def test_the_objective_picks_the_stage() -> None:
    cfg = load_config(None, MAE)
    assert type(stage_for(cfg)) is MAEPretraining
    assert type(stage_for(load_config(None, []))) is Classification  # classify stays the default
    with pytest.raises(ValueError, match="train.objective=mae but no stage for it was passed"):
        pretraining(cfg)


def test_masks_are_the_same_per_key_and_differ_across_keys() -> None:
    base = mask_for(0, 1, 5, 0)
    assert torch.equal(base, mask_for(0, 1, 5, 0))
    for other in [(1, 1, 5, 0), (0, 0, 5, 0), (0, 1, 6, 0), (0, 1, 5, 1)]:
        assert not torch.equal(base, mask_for(*other)), other


def test_built_model_is_the_mae_with_the_configured_decoder_and_a_frozen_head() -> None:
    cfg = load_config(None, [*MAE, "mae.mask_ratio=0.5"])
    stage = MAEPretraining(cfg)
    model = stage.build_model()
    assert isinstance(model, MaskedAutoencoder) and model.mask_ratio == 0.5 and model.norm_pix_loss
    assert len(model.decoder.blocks) == 1 and model.decoder.embed.out_features == 32
    stage.init_model(model, fresh=True)
    trained = {id(p) for g in stage.param_groups(model) for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names == {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    assert "decoder.pred.weight" in names  # the decoder is trained (and checkpointed) with the encoder


def test_batch_loss_ignores_labels_and_is_keyed_by_batch_identity() -> None:
    cfg = load_config(None, MAE)
    stage = MAEPretraining(cfg)
    torch.manual_seed(0)
    model = stage.build_model().eval()
    images = torch.randn(4, 3, 32, 32)

    def loss(labels: list[int], **key: int) -> float:
        return stage.batch_loss(model, images, torch.tensor(labels), **{"rank": 0, "step": 3, "micro": 0, **key}).item()

    ref = loss([0, 1, 2, 3])
    assert loss([3, 3, -1, 0]) == ref  # labels play no part
    assert loss([0, 1, 2, 3], step=4) != ref  # another step, another mask
    assert ref == model(images, generator=mask_generator(cfg.train.seed, 0, 3, 0, 0x3A5E)).loss.item()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["mae.mask_ratio=1.0"], r"mae.mask_ratio must be in \(0, 1\), got 1.0"),
        (["mae.mask_ratio=0"], r"mae.mask_ratio must be in \(0, 1\), got 0"),
        (["mae.mask_ratio=-0.2"], r"mae.mask_ratio must be in \(0, 1\)"),
        ([*MAE, "data.mixup_alpha=0.8"], "data.mixup_alpha=0.8 means nothing there; set data.mixup_alpha=0 or "
         "train.objective=classify"),
        ([*MAE, "data.cutmix_alpha=1.0", "data.label_smoothing=0.1"],
         "data.cutmix_alpha=1.0, data.label_smoothing=0.1 means nothing there; set data.cutmix_alpha=0 "
         "data.label_smoothing=0"),
        ([*MAE, "finetune.init_from=runs/x", "finetune.num_classes=3"], "fine-tuning trains a classifier"),
        (["mae.decoder_dim=30"], "mae.decoder_dim=30 must be a multiple of mae.decoder_heads=16"),
        (["train.objective=dino"], "train.objective"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_label_recipes_stay_allowed_for_classification() -> None:
    cfg = load_config(None, ["data.mixup_alpha=0.8", "data.label_smoothing=0.1", "mae.mask_ratio=0.6"])
    assert cfg.train.objective == "classify" and cfg.mae.mask_ratio == 0.6
