"""Consolidated fp32 exports: one safetensors file + the model config, no DeepSpeed needed to load.

    OUT/model.safetensors, OUT/model.json    our layout (pipeline.model, fine-tuning, evaluation)
    OUT/timm/model.safetensors, config.json  timm's layout: timm.create_model("local-dir:OUT/timm", pretrained=True)

The timm copy carries the architecture and the preprocessing (input size, mean/std, interpolation,
crop fraction, label names) in timm's own config format, so timm loads it with its own loader and
nothing to pass by hand. Exports can also be made from any complete sharded checkpoint after the
fact (`python -m pipeline.train.export RUN_OR_CHECKPOINT OUT`). Every file is readable by the group
and others (the umask permitting), like the rest of a run dir: teammates load each other's models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import DataConfig
from pipeline.data.index import read_index
from pipeline.model.convert import LayoutError, timm_model_args, to_timm
from pipeline.train import engine as ds
from pipeline.train.checkpoint import ResumeInfo, atomic_write, read_state, resolve_checkpoint

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "model.json"
TIMM_DIR = "timm"


def export_checkpoint(info: ResumeInfo | None, out_dir: Path, run_id: str | None = None) -> Path:
    """Write ``out_dir``/model.safetensors and model.json from the checkpoint ``info``."""
    if info is None:
        raise FileNotFoundError("no complete checkpoint to export")
    state = ds.consolidated_state_dict(info.path, info.zero_stage)
    trainer_state = read_state(info.path)
    if run_id is None:
        run_id = trainer_state.get("run_id")
    data = trainer_state.get("config", {}).get("data")
    return write_export(
        state, info.marker["model"], out_dir, step=info.step, source=str(info.path), run_id=run_id, data=data
    )


def write_export(
    state: dict[str, torch.Tensor],
    model_cfg: dict,
    out_dir: Path,
    *,
    step: int,
    source: str,
    run_id: str | None,
    data: dict | None = None,
) -> Path:
    """Our layout, plus timm's where timm can express the model. ``data``: the run's data config (preprocessing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, out_dir / WEIGHTS)
    meta = {"format": 1, "model": model_cfg, "step": step, "source": source, "run_id": run_id}
    meta["timm"] = _write_timm(state, model_cfg, data or {}, out_dir / TIMM_DIR)
    atomic_write(out_dir / META, json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600
    tmp.replace(path)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_timm(state: dict[str, torch.Tensor], model_cfg: dict, data: dict, out: Path) -> str:
    """``out``/model.safetensors + config.json in timm's layout; what was written, or why not."""
    try:
        architecture, args = timm_model_args(model_cfg)
        weights = to_timm(state, channels=model_cfg["channels"], patch_size=_pair(model_cfg["patch_size"]),
                          fc_norm=args["fc_norm"])  # fmt: skip
    except LayoutError as e:
        log.warning("no timm copy of this export: %s", e)
        return f"not written: {e}"
    out.mkdir(parents=True, exist_ok=True)
    _save_weights({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, out / WEIGHTS)
    config = {
        "architecture": architecture,
        "num_classes": model_cfg["num_classes"],
        "num_features": model_cfg["dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": _pretrained_cfg(model_cfg, data),
    }
    names = _label_names(data, model_cfg["num_classes"])
    if names:
        config["label_names"] = names
    atomic_write(out / "config.json", json.dumps(config, indent=1))
    return "written"


def _pair(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _pretrained_cfg(model_cfg: dict, data: dict) -> dict:
    """timm's preprocessing record, from the run's own evaluation transform (resize, centre crop)."""
    h, w = _pair(model_cfg["image_size"])
    return {
        "input_size": [model_cfg["channels"], h, w],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # our eval resize (pipeline/data/transforms.py)
        "crop_pct": data.get("eval_crop_pct", DataConfig.eval_crop_pct),
        "crop_mode": "center",
        "mean": list(data.get("mean", DataConfig.mean)),
        "std": list(data.get("std", DataConfig.std)),
        "num_classes": model_cfg["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def _label_names(data: dict, num_classes: int) -> list[str]:
    """The class names of the run's data index, when it is still readable and names as many classes."""
    try:
        classes = list(read_index(data["path"]).classes)
    except Exception:  # moved, unmounted, or no data config: the names are optional
        return []
    return classes if len(classes) == num_classes else []


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of an export directory or its model.safetensors file."""
    path = Path(path)
    out_dir = path.parent if path.is_file() else path
    weights = out_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{out_dir} has no {WEIGHTS}; expected an export written by pipeline.train.export")
    meta = json.loads((out_dir / META).read_text()) if (out_dir / META).exists() else {}
    return load_file(str(weights)), meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Consolidate a sharded checkpoint into fp32 safetensors")
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, or one checkpoints/step_* dir")
    parser.add_argument("out", help="output directory (model.safetensors + model.json)")
    args = parser.parse_args(argv)
    out = export_checkpoint(resolve_checkpoint(args.checkpoint), Path(args.out))
    print(f"wrote {out / WEIGHTS}")


if __name__ == "__main__":
    main()
