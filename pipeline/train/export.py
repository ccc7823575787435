"""Consolidated fp32 exports that load in timm and in this project, no DeepSpeed needed.

    OUT/model.safetensors   the weights, in timm's layout (our own where timm cannot express the model)
    OUT/config.json         timm's config: architecture, model arguments, preprocessing, class names
    OUT/model.json          ours: the model config, step, source checkpoint, MLflow run id, layout

So an export folder is a timm model folder: ``timm.create_model("local-dir:OUT", pretrained=True)``
rebuilds the model with its preprocessing, and timm's other path (its own model, this file as
``pretrained_cfg_overlay=dict(file=...)``) loads the same weights; our layout stored there used to
load through it silently wrong (timm reshapes a 2-D patch projection as (c, p1, p2), ours is
(p1, p2, c)). ``pipeline.artifacts.exports.load_export`` gives our layout back whichever is stored. Exports can also be
made from any complete sharded checkpoint after the fact (``python -m pipeline.train.export
RUN_OR_CHECKPOINT OUT``). Files are readable by group and others (the umask permitting), like the
rest of a run dir: teammates load each other's models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.artifacts.checkpoints import ResumeInfo, read_state, resolve_checkpoint
from pipeline.artifacts.exports import META, TIMM_CONFIG, WEIGHTS
from pipeline.config import DataConfig
from pipeline.data.index import read_index
from pipeline.durable import atomic_write, atomic_write_via
from pipeline.model.convert import OUR_LAYOUT_MARKER, LayoutError, timm_model_args, to_timm
from pipeline.model.mae import DECODER_PREFIX
from pipeline.model.presets import pair
from pipeline.train import engine as ds

log = logging.getLogger(__name__)


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
    """timm's layout where timm can express the model, else ours. ``data``: the run's data config.

    An MAE run's decoder is left out: the export is the encoder, a plain ViT that timm and fine-tuning
    load; the checkpoints keep the decoder for resuming the pretraining (issue 18)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().float().contiguous().cpu() for k, v in state.items() if not k.startswith(DECODER_PREFIX)}
    meta = {"format": 1, "model": model_cfg, "step": step, "source": source, "run_id": run_id}
    if len(ours) < len(state):
        meta["left_out"] = f"{len(state) - len(ours)} {DECODER_PREFIX}* tensors (the MAE decoder; in the checkpoints)"
    meta["timm"] = _write_timm(ours, model_cfg, data or {}, out_dir)
    meta["layout"] = "timm" if meta["timm"] == "written" else "ours"
    if meta["layout"] == "ours":
        (out_dir / TIMM_CONFIG).unlink(missing_ok=True)  # an earlier export's, now stale
        _save_weights({**ours, OUR_LAYOUT_MARKER: torch.zeros(1)}, out_dir / WEIGHTS)
    atomic_write(out_dir / META, json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600

    atomic_write_via(path, write)


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
    """``out``/model.safetensors + config.json in timm's layout: "written", or why not."""
    try:
        architecture, args = timm_model_args(model_cfg)
        weights = to_timm(state, channels=model_cfg["channels"], patch_size=pair(model_cfg["patch_size"]),
                          fc_norm=args["fc_norm"])  # fmt: skip
    except LayoutError as e:
        log.warning("no timm copy of this export: %s", e)
        return f"not written: {e}"
    _save_weights({k: v.contiguous() for k, v in weights.items()}, out / WEIGHTS)
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
    atomic_write(out / TIMM_CONFIG, json.dumps(config, indent=1))
    return "written"


def _pretrained_cfg(model_cfg: dict, data: dict) -> dict:
    """timm's preprocessing record, from the run's own evaluation transform (resize, centre crop)."""
    h, w = pair(model_cfg["image_size"])
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Consolidate a sharded checkpoint into fp32 safetensors")
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, or one checkpoints/step_* dir")
    parser.add_argument("out", help="output directory (model.safetensors, config.json for timm, model.json)")
    args = parser.parse_args(argv)
    out = export_checkpoint(resolve_checkpoint(args.checkpoint), Path(args.out))
    print(f"wrote {out / WEIGHTS}")


if __name__ == "__main__":
    main()
