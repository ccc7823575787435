"""`python -m pipeline.train --config CONFIG [section.key=value ...]`, launched once per rank.

Works under torchrun, the deepspeed launcher, `srun`, launch/submit.py, or as one local process.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import ConfigError, load_config
from pipeline.tracking.tags import SOURCE_ENV, source_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a ViT with DeepSpeed ZeRO on WebDataset shards (one process per rank).",
        epilog="Example: torchrun --nproc_per_node 2 -m pipeline.train --config configs/smoke.yaml train.steps=50\n"
        "Exit status: 0 completed, 2 bad config, 3 stopped for requeue, 4 completed but some metrics never "
        "reached the tracking store (kept in <run_dir>/tracking_buffer.jsonl, replayed at the next start).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (default: the embedded local defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The ranks of this job name their source in MLflow (a job of launch/submit.py already has it).
    os.environ.setdefault(SOURCE_ENV, source_name("python -m pipeline.train", args.config))
    from pipeline.logs import announce_start
    from pipeline.train.dist_env import detect

    env = detect()
    announce_start(
        env.rank, f"rank {env.rank} of {env.world_size}, run dir {cfg.train.run_dir}; loading torch and DeepSpeed"
    )
    from pipeline.stages import stage_for  # the entry point picks the stage: the engine imports none
    from pipeline.train import run

    result = run(cfg, stage=stage_for(cfg), overrides=args.overrides)
    if result.status != "completed":
        return 3
    return 4 if result.undelivered else 0  # trained, but the tracking store never got everything


if __name__ == "__main__":
    sys.exit(main())
