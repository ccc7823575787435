"""Fine-tuning: start from a pretrained backbone with a new head for the downstream classes.

``finetune.init_from`` may name a pretrain run dir (its newest complete checkpoint), one sharded
ZeRO checkpoint (any stage, consolidated on the fly, no conversion step), an export written by
``pipeline.train.export``, or a state-dict file in our, the seed's, vit-pytorch's or timm's layout.
The old head is dropped, a new one built (zero init by default, ViT paper sec. 3.2), the position
embedding resampled when the image size changes, and exactly which keys were loaded,
re-initialised and ignored is reported. Layer-wise LR decay lives in the recipe's parameter groups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.model import ViT
from pipeline.model.convert import to_ours
from pipeline.model.presets import pair
from pipeline.train import checkpoint as ckpt
from pipeline.train.export import META, WEIGHTS, load_export

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."
# Architecture keys a backbone must share with the model being fine-tuned.
_BACKBONE_KEYS = ("patch_size", "dim", "depth", "heads", "mlp_dim", "dim_head", "channels", "qkv_bias",
                  "patch_norm", "class_token")  # fmt: skip


class FinetuneError(ValueError):
    """The pretrained weights cannot initialise this model; the message says why and how to fix it."""


@dataclass
class Source:
    """Where the pretrained weights came from, for the report and the MLflow link."""

    kind: str  # "checkpoint" | "export" | "state_dict"
    path: Path
    state: dict[str, torch.Tensor]
    model_cfg: dict | None = None  # the pretraining model config, when the source records it
    run_id: str | None = None  # the pretraining MLflow run, when known
    step: int | None = None


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


def load_source(path: str | Path) -> Source:
    """Read the pretrained weights ``path`` points at (see the module docstring for the forms)."""
    path = Path(path)
    if not path.exists():
        raise FinetuneError(
            f"finetune.init_from={str(path)!r} does not exist; point it at a pretrain run dir, a "
            f"checkpoints/step_* dir, an export dir, or a state-dict file"
        )
    if path.is_dir() and ((path / WEIGHTS).exists() or (path / "export" / WEIGHTS).exists()) and not _has_ckpt(path):
        return _from_export(path if (path / WEIGHTS).exists() else path / "export")
    if path.is_dir():
        return _from_checkpoint(path)
    if path.name == WEIGHTS and (path.parent / META).exists():
        return _from_export(path.parent)
    return Source("state_dict", path, _read_state_dict(path))


def check_source(cfg: Config) -> str:
    """Before a job is queued: ``finetune.init_from`` exists and records the architecture of
    ``cfg.model`` (read from the checkpoint's commit marker or the export's metadata; no weights
    are loaded). Raises FinetuneError naming the fix; returns a one-line summary."""
    path = Path(cfg.finetune.init_from)
    if not path.exists():
        load_source(path)  # raises the "does not exist" error
    if path.is_dir() and ((path / WEIGHTS).exists() or (path / "export" / WEIGHTS).exists()) and not _has_ckpt(path):
        out_dir = path if (path / WEIGHTS).exists() else path / "export"
        meta = json.loads((out_dir / META).read_text()) if (out_dir / META).exists() else {}
        source = Source("export", out_dir, {}, meta.get("model"), step=meta.get("step"))
    elif path.is_dir():
        try:
            info = ckpt.resolve_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise FinetuneError(f"finetune.init_from: {e}") from None
        source = Source("checkpoint", info.path, {}, info.marker.get("model"), step=info.step)
    else:
        return f"finetune: init from {path} (a state-dict file: shapes are checked when it loads)"
    check_architecture(source, cfg)
    at = f" (step {source.step})" if source.step is not None else ""
    return f"finetune: init from {source.path}{at}, same backbone architecture as model.*"


def _has_ckpt(path: Path) -> bool:
    return (path / ckpt.MARKER).exists() or ckpt.checkpoints_dir(path).is_dir()


def _from_export(out_dir: Path) -> Source:
    state, meta = load_export(out_dir)
    return Source("export", out_dir, state, meta.get("model"), meta.get("run_id"), meta.get("step"))


def _from_checkpoint(path: Path) -> Source:
    from pipeline.train import engine as ds  # DeepSpeed only for sharded checkpoints

    try:
        info = ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise FinetuneError(f"finetune.init_from: {e}") from None
    state = ds.consolidated_state_dict(info.path, info.zero_stage)
    run_id = None
    try:
        run_id = ckpt.read_state(info.path).get("run_id")
    except (OSError, ValueError):
        pass
    return Source("checkpoint", info.path, state, info.marker.get("model"), run_id, info.step)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise FinetuneError(f"finetune.init_from={str(path)!r} is not a readable state dict ({e})") from None
    for key in ("model", "state_dict", "module", "model_state"):  # common wrappers
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FinetuneError(f"finetune.init_from={str(path)!r} does not hold a state dict of tensors")
    return dict(raw)


def check_architecture(source: Source, cfg: Config) -> None:
    """Refuse a backbone of another shape, key by key, before anything is built."""
    if source.model_cfg is None:
        return  # a bare state dict: shapes are checked against the model when loading
    ours = cfg.model
    diff = [
        f"model.{k}: pretrained {source.model_cfg.get(k)!r} vs config {getattr(ours, k)!r}"
        for k in _BACKBONE_KEYS
        if k in source.model_cfg and _norm(source.model_cfg[k]) != _norm(getattr(ours, k))
    ]
    if diff:
        raise FinetuneError(
            f"the pretrained model at {source.path} has another architecture: {'; '.join(diff)}. "
            f"Set these model.* keys to the pretrained values (or pick a matching model.preset)."
        )


def _norm(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def init_from_pretrained(model: ViT, cfg: Config) -> InitReport:
    """Load the backbone of ``cfg.finetune.init_from`` into ``model``; new head; freeze as asked."""
    source = load_source(cfg.finetune.init_from)
    check_architecture(source, cfg)
    state = to_ours(source.state)
    report = InitReport(str(source.path), source.kind, source.run_id, source.step)
    state = _adapt_pos_embed(state, model, source, report)
    _load_backbone(model, state, report)
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
