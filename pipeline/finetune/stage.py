"""Fine-tuning as a stage of the engine (pipeline.train.stage): pretrained backbone, new head,
freezing, and the best evaluation's weights kept under <run_dir>/export/best."""

from __future__ import annotations

import logging

from pipeline import metric_names as mn
from pipeline.config import config_to_dict
from pipeline.finetune import InitReport, freeze, init_from_pretrained, report_tags
from pipeline.model import ViT
from pipeline.tracking import pretrain_tags
from pipeline.train import engine as ds
from pipeline.train.export import write_export
from pipeline.train.setup import Run
from pipeline.train.stage import Classification

log = logging.getLogger(__name__)


class FineTune(Classification):
    """Classification (same loss and parameter groups) started from ``finetune.init_from``."""

    report: InitReport | None = None

    def init_model(self, model: ViT, *, fresh: bool) -> None:
        ft = self.cfg.finetune
        if fresh:
            self.report = init_from_pretrained(model, self.cfg)
        else:
            freeze(model, ft.freeze, ft.freeze_blocks)  # same groups as the saved optimizer

    def after_eval(self, r: Run, metrics: dict[str, float]) -> None:
        if self.cfg.finetune.export_best:
            export_best(r, metrics[mn.EVAL_TOP1])

    def tags(self) -> dict[str, str]:
        if self.report is None:  # resumed: the first start tagged the run
            return {}
        return {**pretrain_tags(self.cfg.finetune.init_from), **report_tags(self.report)}


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
        r.tracker.set_tags({"best_top1": f"{top1:.4f}", "best_step": str(r.state.step)})
