"""The comparison table of runs (tracking/read.py): pure functions, no store."""

from __future__ import annotations

from pipeline.tracking.read import RunSummary, compare_rows, format_table


def test_compare_rows_show_only_differences_by_default() -> None:
    def run(name: str, lr: str, top1: float) -> RunSummary:
        params = {"optim.lr": lr, "train.zero_stage": "2", "tracking.uri": name}
        return RunSummary(name * 4, name, "1", "pretrain", "FINISHED", "u", params, {"eval/top1": top1})

    rows = dict(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)]))
    assert rows["optim.lr"] == ["0.001", "0.0003"]
    assert rows["eval/top1"] == ["0.5", "0.625"]
    assert "train.zero_stage" not in rows and "tracking.uri" not in rows
    all_rows = dict(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)], all_params=True))
    assert all_rows["train.zero_stage"] == ["2", "2"]
    table = format_table(compare_rows([run("a", "0.001", 0.5), run("b", "0.0003", 0.625)]))
    assert table.splitlines()[0].split() == ["run", "a", "b"]
