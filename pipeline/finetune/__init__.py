"""Fine-tuning: start from a pretrained backbone with a new head for the downstream classes.

    source.py     where the pretrained weights come from: find, read and check them (before a job too)
    backbone.py   put them into the model: new head, resampled position embedding, freezing, the report
    best.py       keep the best evaluation's weights under <run_dir>/export/best
    stage.py      FineTune, the engine's stage (pipeline.train.stage) that uses the three

This package re-exports the first two only: the launcher's checks import it without the engine
(``stage`` and ``best`` import pipeline.train).
"""

from pipeline.finetune.backbone import HEAD_PREFIX, InitReport, freeze, init_from_pretrained, report_json, report_tags
from pipeline.finetune.source import FinetuneError, Source, check_architecture, check_source, load_source

__all__ = [
    "HEAD_PREFIX",
    "FinetuneError",
    "InitReport",
    "Source",
    "check_architecture",
    "check_source",
    "freeze",
    "init_from_pretrained",
    "load_source",
    "report_json",
    "report_tags",
]
