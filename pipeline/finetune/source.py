"""Where fine-tuning's pretrained weights come from: find, read and check them.

``finetune.init_from`` may name a pretrain run dir (its newest complete checkpoint), one sharded
ZeRO checkpoint (any stage, consolidated on the fly, no conversion step), an export written by
``pipeline.train.export``, or a state-dict file in our, the seed's, vit-pytorch's or timm's layout.
Checkpoints and exports are read through pipeline.artifacts (the readers), never the engine's
writers; only a sharded checkpoint needs DeepSpeed (the engine seam) to be consolidated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.artifacts import checkpoints as stored
from pipeline.artifacts.exports import META, WEIGHTS, load_export
from pipeline.config import Config

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
            info = stored.resolve_checkpoint(path)
        except stored.CheckpointError as e:
            raise FinetuneError(f"finetune.init_from: {e}") from None
        source = Source("checkpoint", info.path, {}, info.marker.get("model"), step=info.step)
    else:
        return f"finetune: init from {path} (a state-dict file: shapes are checked when it loads)"
    check_architecture(source, cfg)
    at = f" (step {source.step})" if source.step is not None else ""
    return f"finetune: init from {source.path}{at}, same backbone architecture as model.*"


def _has_ckpt(path: Path) -> bool:
    return (path / stored.MARKER).exists() or stored.checkpoints_dir(path).is_dir()


def _from_export(out_dir: Path) -> Source:
    state, meta = load_export(out_dir)
    return Source("export", out_dir, state, meta.get("model"), meta.get("run_id"), meta.get("step"))


def _from_checkpoint(path: Path) -> Source:
    from pipeline.train import engine as ds  # DeepSpeed only for sharded checkpoints

    try:
        info = stored.resolve_checkpoint(path)
    except stored.CheckpointError as e:
        raise FinetuneError(f"finetune.init_from: {e}") from None
    state = ds.consolidated_state_dict(info.path, info.zero_stage)
    run_id = None
    try:
        run_id = stored.read_state(info.path).get("run_id")
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
