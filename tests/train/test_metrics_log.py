"""metrics.jsonl (train/metrics_log.py) and the metric-name table (pipeline/metric_names.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import metric_names as mn
from pipeline.train.metrics_log import METRICS_FILE, MetricsLog, read_metrics_log

REPO = Path(__file__).resolve().parents[2]


def test_one_value_per_key_and_step_across_a_rollback_and_a_reopen(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        log.record(step, {mn.TRAIN_LOSS: float(step)})
    log.record(4, {mn.EVAL_TOP1: 0.5})
    log.record(4, {mn.EVAL_TOP1: 0.9})  # the same step's evaluation again: not written twice
    log.supersede(2)  # back to the checkpoint of step 2
    assert [(r["step"], r.get(mn.TRAIN_LOSS)) for r in read_metrics_log(tmp_path)] == [(1, 1.0), (2, 2.0)]
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 3, "train/lo')  # torn by a kill mid-write
    again = MetricsLog(tmp_path, enabled=True)  # the next attempt of the run
    assert again.logged == {mn.TRAIN_LOSS: 2}
    again.record(2, {mn.TRAIN_LOSS: 7.0})  # at or below what is there: dropped
    again.record(3, {mn.TRAIN_LOSS: 3.5})
    records = read_metrics_log(tmp_path)
    assert [(r["step"], r[mn.TRAIN_LOSS]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=False)
    log.record(1, {mn.TRAIN_LOSS: 1.0})
    log.supersede(0)
    assert not (tmp_path / METRICS_FILE).exists()


def test_every_name_is_in_the_table() -> None:
    doc = mn.__doc__ or ""
    names = [v for k, v in vars(mn).items() if k.isupper() and isinstance(v, str)]
    assert len(names) == 19  # data/gpu_decode_fallbacks (issue 17) is the last one
    for name in names:
        assert f"``{name}" in doc, name
    assert mn.data_skipped("corrupt_image") == "data/skipped_corrupt_image"


def test_no_metric_key_is_spelled_outside_the_table() -> None:
    """pipeline/ and launch/ name metric keys through pipeline/metric_names.py (docstrings aside)."""
    literal = re.compile(r"""(?<![\w/.])["'](?:train|eval|data|system)/[a-z_0-9]*["']""")
    found = []
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "launch").rglob("*.py")]:
        if path.name == "metric_names.py":
            continue
        text = path.read_text()
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if literal.search(code) and not code.lstrip().startswith(("tracker.", ">>>")):
                found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_metric_file_records_are_plain_json(tmp_path: Path) -> None:
    MetricsLog(tmp_path, enabled=True).record(5, {mn.EVAL_LOSS: 1.25})
    (record,) = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert set(record) == {"step", "time", mn.EVAL_LOSS} and record["step"] == 5
