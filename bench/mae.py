"""MAE vs classification pretraining throughput on the same ViT (issue 18): one training step
(forward, backward, AdamW) of each, interleaved, medians compared, and the analytic MACs of both
(pipeline/model/flops.py). MAE's encoder sees a quarter of the tokens, so it should be markedly
faster per image; its decoder (every position, narrower) takes part of that back.

    python bench/mae.py [--reps 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/mae.py` from the checkout: bench.model is a sibling

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.model import cpu_name, interleaved  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import ViT, forward_macs  # noqa: E402
from pipeline.model.mae import MaskedAutoencoder  # noqa: E402

CASES = {  # name: (config file, overrides, batch)
    "configs/pretrain/mae_tiny.yaml (demo ViT, decoder 64x2)": (REPO / "configs/pretrain/mae_tiny.yaml", [], 32),
    "ViT-B/16 224, MAE's decoder 512x8 (configs/pretrain/mae_vit_b16.yaml)": (
        REPO / "configs/pretrain/mae_vit_b16.yaml",
        ["data.path=runs/data/synthetic"],
        4,
    ),
}


def _steps(
    config: Path | None, overrides: list[str], batch: int
) -> tuple[Callable[[], None], Callable[[], None], int, int]:
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    vit = ViT(**cfg.model.vit_kwargs())
    mae = MaskedAutoencoder(**cfg.model.vit_kwargs(), **cfg.mae.model_kwargs())
    mae.head.requires_grad_(False)  # as the MAE stage: the head takes no part
    size = vit.image_size
    img, labels = torch.randn(batch, 3, *size), torch.randint(0, cfg.model.num_classes, (batch,))
    opt_v = torch.optim.AdamW(vit.parameters(), lr=1e-4)
    opt_m = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def classify() -> None:
        F.cross_entropy(vit(img), labels).backward()
        opt_v.step()
        opt_v.zero_grad(set_to_none=True)

    def masked() -> None:
        mae(img, generator=gen).loss.backward()
        opt_m.step()
        opt_m.zero_grad(set_to_none=True)

    return classify, masked, forward_macs(vit), forward_macs(mae)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}; torch {torch.__version__}, {args.threads} threads, fp32, median of {args.reps} interleaved")
    print(f"{'model, batch':<58} {'classify':>12} {'MAE':>12} {'img/s ratio':>12} {'MACs ratio':>11}")
    for name, (config, overrides, batch) in CASES.items():
        classify, masked, macs_c, macs_m = _steps(config, overrides, batch)
        t_c, t_m = interleaved(classify, masked, args.reps)
        print(
            f"{name + f', b{batch}':<58} {batch / t_c:>8.1f} i/s {batch / t_m:>8.1f} i/s {t_c / t_m:>12.2f} "
            f"{macs_c / macs_m:>11.2f}"
        )


if __name__ == "__main__":
    main()
