"""Putting a pretrained backbone into the model: new head, resampled position embedding, freezing.

The old head is dropped, a new one built (zero init by default, ViT paper sec. 3.2), the position
embedding resampled when the image size changes, and exactly which keys were loaded,
re-initialised and ignored is reported. Layer-wise LR decay lives in the recipe's parameter groups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pipeline.config import Config
from pipeline.finetune.source import FinetuneError, Source, check_architecture, load_source
from pipeline.model import ViT
from pipeline.model.convert import to_ours
from pipeline.model.mae import DECODER_PREFIX
from pipeline.model.presets import pair

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."


@dataclass
class InitReport:
    source: str
    kind: str
    pretrain_run_id: str | None
    step: int | None
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def init_from_pretrained(model: ViT, cfg: Config) -> InitReport:
    """Load the backbone of ``cfg.finetune.init_from`` into ``model``; new head; freeze as asked."""
    source = load_source(cfg.finetune.init_from)
    check_architecture(source, cfg)
    # An MAE run's checkpoint holds its decoder beside the encoder: not a backbone part, dropped and
    # reported (the layout converters know ViT keys only).
    decoder = sorted(k for k in source.state if k.startswith(DECODER_PREFIX))
    state = to_ours({k: v for k, v in source.state.items() if not k.startswith(DECODER_PREFIX)})
    report = InitReport(str(source.path), source.kind, source.run_id, source.step)
    state = _adapt_pos_embed(state, model, source, report)
    _load_backbone(model, state, report)
    report.ignored = sorted(report.ignored + decoder)
    model.reset_head(cfg.finetune.num_classes, init=cfg.finetune.head_init)
    freeze(model, cfg.finetune.freeze, cfg.finetune.freeze_blocks)
    log.info(
        "fine-tune init from %s (%s): %d tensors loaded, re-initialised %s, ignored %s%s",
        report.source, report.kind, len(report.loaded), report.reinitialised or "none", report.ignored or "none",
        f", resampled {report.resized}" if report.resized else "",
    )  # fmt: skip
    return report


def _adapt_pos_embed(state: dict, model: ViT, source: Source, report: InitReport) -> dict:
    """Resample the pretrained position embedding onto this model's patch grid if it differs."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return state
    prefix = model.num_prefix_tokens
    tokens = pos.shape[1] - prefix
    old_size = (source.model_cfg or {}).get("image_size")
    if old_size is not None:
        grid = tuple(s // p for s, p in zip(pair(old_size), model.patch_size, strict=True))
    else:
        side = int(round(tokens**0.5))
        grid = (side, side)
    if grid[0] * grid[1] != tokens:
        raise FinetuneError(
            f"cannot resample pos_embed of {source.path}: {tokens} patch positions do not form a grid {grid}"
        )
    donor = ViT(**{**model.init_kwargs, "image_size": (grid[0] * model.patch_size[0], grid[1] * model.patch_size[1])})
    donor.pos_embed.data.copy_(pos)
    donor.resize_pos_embed(model.image_size)
    report.resized.append(f"pos_embed {tuple(pos.shape)} -> {tuple(donor.pos_embed.shape)}")
    return {**state, "pos_embed": donor.pos_embed.detach()}


def _load_backbone(model: ViT, state: dict, report: InitReport) -> None:
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    report.ignored = sorted(k for k in state if k.startswith(HEAD_PREFIX) or k not in own)
    mismatched = [
        f"{k}: pretrained {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in backbone.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(k for k in own if not k.startswith(HEAD_PREFIX) and k not in backbone)
    if mismatched or missing:
        raise FinetuneError(
            "pretrained weights do not fit the model: "
            + "; ".join(mismatched + [f"{k}: missing from the pretrained weights" for k in missing])
            + ". Set model.* (dim, depth, heads, mlp_dim, patch_size, ...) to the pretrained architecture."
        )
    model.load_state_dict({k: v for k, v in backbone.items() if k in own}, strict=False)
    report.loaded = sorted(k for k in backbone if k in own)
    report.reinitialised = sorted(k for k in own if k.startswith(HEAD_PREFIX))


def freeze(model: ViT, mode: str, blocks: int) -> None:
    """``backbone``: train only the head (linear probe, final norm frozen too); ``blocks=K``: freeze
    the patch embedding, CLS/position embeddings and the first K blocks."""
    if mode == "backbone":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(HEAD_PREFIX)
        return
    if blocks:
        for name, p in model.named_parameters():
            if model.layer_id(name) <= blocks:
                p.requires_grad = False


def report_tags(report: InitReport) -> dict[str, str]:
    """What the fine-tune init did, as MLflow tags (the pretrain run link: pipeline.tracking.pretrain_tags)."""
    tags = {
        "finetune.init_from": report.source,
        "finetune.init_kind": report.kind,
        "finetune.loaded_tensors": str(len(report.loaded)),
        "finetune.reinitialised": ",".join(report.reinitialised),
    }
    if report.step is not None:
        tags["finetune.pretrain_step"] = str(report.step)
    return tags


def report_json(report: InitReport) -> str:
    return json.dumps(report.__dict__, indent=1)
