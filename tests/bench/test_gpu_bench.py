"""bench/gpu.py: every row's code path at tiny sizes on CPU (--smoke), and the rules that keep a
one-shot GPU run useful: an error or the budget ends a row, never the table."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def read_table(path: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """(header text, rows by key): cells split on unescaped pipes."""
    text = path.read_text()
    head, _, body = text.partition("\n| row |")
    lines = [line for line in ("| row |" + body).splitlines() if line.startswith("|")]
    cols = [c.strip() for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0]] = dict(zip(cols, cells, strict=True))
    return head, rows


@pytest.fixture
def gpu_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/gpu.py as a module; its sibling imports (bench/accel.py, data.py, train.py) leave sys.modules after."""
    monkeypatch.syspath_prepend(str(BENCH))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    for name in set(sys.modules) - before:
        if name in ("accel", "data", "train"):
            del sys.modules[name]


def test_an_error_or_the_budget_ends_a_row_and_the_table_says_so(gpu_bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    args = gpu_bench.parse_args(["--device", "cpu", "--out", str(out), "--budget-s", "3", "--min-row-s", "1"])
    bench = gpu_bench.Bench(args, tmp_path)

    def fine(b: object, row: object) -> None:
        row.img_s = "12.5"

    def broken(b: object, row: object) -> None:
        raise ValueError("bad | news\nsecond line")

    def slow(b: object, row: object) -> None:
        time.sleep(30)

    t0 = time.monotonic()
    bench.run("b16-eager", fine)
    bench.run("b16-compiled", broken)
    bench.run("l16-compiled", slow)  # cut when the 3 s budget ends, not after 30 s
    bench.run("loader-pil", fine)  # no budget left: not started
    assert time.monotonic() - t0 < 10
    head, rows = read_table(out)  # written after every row: what a killed run leaves behind
    assert rows["b16-eager"]["img/s"] == "12.5" and rows["b16-eager"]["status"].startswith("ok")
    assert rows["b16-compiled"]["status"] == r"error: ValueError: bad \| news second line"
    stopped = re.fullmatch(r"stopped: budget reached after (\d+) s", rows["l16-compiled"]["status"])
    assert stopped and 2 <= int(stopped[1]) <= 6, rows["l16-compiled"]  # at the 3 s budget (a loaded machine: later)
    assert re.fullmatch(r"skipped: budget \(-?\d+ s left of 3 s\)", rows["loader-pil"]["status"])
    assert rows["loader-pil"]["img/s"] == "-"
    assert rows["train-engine"]["status"] == "not run"
    assert "so far (running)" in head
    assert list(rows) == [r.key for r in gpu_bench.ROWS]


def number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in {text!r}"
    return float(m.group(1))


@pytest.mark.timeout(360)  # the engine row starts DeepSpeed in a fresh rank: ~40 s of it on 2 loaded cores
def test_smoke_run_on_cpu_fills_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    cmd = [
        sys.executable,
        str(BENCH / "gpu.py"),
        "--device",
        "cpu",
        "--smoke",
        "--out",
        str(out),
        "--dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stderr[-4000:]
    head, rows = read_table(out)
    assert "in all" in head and "GPU: none (CPU run)" in head and "torch 2." in head and "deepspeed " in head
    models = ["b16-eager", "b16-compiled", "b16-eager-ckpt", "b16-compiled-ckpt", "l16-compiled"]
    assert list(rows) == [*models, "loader-pil", "loader-nvjpeg", "train-engine", "ckpt-save"]
    for key, row in rows.items():
        if key == "loader-nvjpeg":
            assert row["status"] == "skipped: no CUDA (nvJPEG decodes on the GPU)", row
            continue
        assert row["status"].startswith("ok ("), (key, row)
        if key != "ckpt-save":
            assert float(row["img/s"]) > 0 and int(row["batch"]) > 0, (key, row)
    for key in models:
        assert rows[key]["batch"] == "16", rows[key]  # the search doubles 4 -> 8 -> 16, the --smoke cap
        assert rows[key]["MFU"] == "-" and rows[key]["peak mem GiB"] == "-"  # no peak, no CUDA memory on CPU
    per_worker = number(rows["loader-pil"]["other"], r"1 workers: ([\d.]+) img/s per worker")
    assert per_worker == float(rows["loader-pil"]["img/s"])
    wait = number(rows["train-engine"]["other"], r"data wait ([\d.]+)% of the time")
    assert 0 <= wait <= 100
    assert "steps 5-12 counted" in rows["train-engine"]["other"]  # log windows of 4 steps, the first left out
    save = rows["ckpt-save"]["other"]
    assert number(save, r"save ([\d.]+) GB/s") > 0 and number(save, r"dd conv=fsync ([\d.]+) GB/s") > 0
