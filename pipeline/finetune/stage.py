"""Fine-tuning as a stage of the engine (pipeline.train.stage): pretrained backbone, new head,
freezing (backbone.py), and the best evaluation's weights kept (best.py)."""

from __future__ import annotations

from pipeline import metric_names as mn
from pipeline.finetune.backbone import InitReport, freeze, init_from_pretrained, report_tags
from pipeline.finetune.best import export_best
from pipeline.model import ViT
from pipeline.tracking import pretrain_tags
from pipeline.train.lifecycle import Run
from pipeline.train.stage import Classification


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
        r = self.report
        return {**pretrain_tags(self.cfg.finetune.init_from, loaded=r.source, step=r.step), **report_tags(r)}
