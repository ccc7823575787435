"""Consolidated fp32 exports: one safetensors file + the model config, no DeepSpeed needed to load.

Fine-tuning, evaluation and the timm export read these; they can also be made from any complete
sharded checkpoint after the fact (`python -m pipeline.train.export RUN_OR_CHECKPOINT OUT`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.durable import atomic_write, atomic_write_via
from pipeline.train import engine as ds
from pipeline.train.checkpoint import ResumeInfo, read_state, resolve_checkpoint

WEIGHTS = "model.safetensors"
META = "model.json"


def export_checkpoint(info: ResumeInfo | None, out_dir: Path, run_id: str | None = None) -> Path:
    """Write ``out_dir``/model.safetensors and model.json from the checkpoint ``info``."""
    if info is None:
        raise FileNotFoundError("no complete checkpoint to export")
    state = ds.consolidated_state_dict(info.path, info.zero_stage)
    if run_id is None:
        run_id = read_state(info.path).get("run_id")
    return write_export(state, info.marker["model"], out_dir, step=info.step, source=str(info.path), run_id=run_id)


def write_export(
    state: dict[str, torch.Tensor], model_cfg: dict, out_dir: Path, *, step: int, source: str, run_id: str | None
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    atomic_write_via(out_dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    meta = {"format": 1, "model": model_cfg, "step": step, "source": source, "run_id": run_id}
    atomic_write(out_dir / META, json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


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
