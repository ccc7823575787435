"""Keeping the best evaluation's weights of a fine-tune under <run_dir>/export/best.

An export in the engine's format (pipeline.train.export writes it), replaced each time eval/top1
improves; the checkpoint remembers the best so far (``best_top1``), so a resume keeps comparing.
"""

from __future__ import annotations

import logging

from pipeline import metric_names as mn
from pipeline.config import config_to_dict
from pipeline.train import engine as ds
from pipeline.train.export import write_export
from pipeline.train.lifecycle import Run

log = logging.getLogger(__name__)


def export_best(r: Run, top1: float) -> None:
    """Keep the weights of the best evaluation so far under <run_dir>/export/best."""
    best = r.state.best_top1
    if best is not None and top1 <= best:
        return
    r.state.best_top1 = top1
    state = ds.gathered_state_dict(r.engine)  # collective under ZeRO-3
    if r.env.rank == 0:
        out = write_export(
            state, config_to_dict(r.cfg.model), r.run_dir / "export" / "best", step=r.state.step,
            source=f"best eval/top1={top1:.4f}", run_id=r.tracker.run_id, data=config_to_dict(r.cfg.data),
        )  # fmt: skip
        log.info("new best eval/top1 %.4f at step %d: exported to %s", top1, r.state.step, out)
        # A metric, so the runs table sorts by it; the tags stay for readers of the run's tags.
        r.tracker.log_metrics({mn.EVAL_BEST_TOP1: top1}, r.state.step)
        r.tracker.set_tags({"best_top1": f"{top1:.4f}", "best_step": str(r.state.step)})
