"""The loss/accuracy PNG every run carries as an artifact (rendered from the metric history)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking.state import Record

_PANELS = (
    ("loss", lambda k: k.endswith("loss")),
    ("accuracy", lambda k: any(s in k.rpartition("/")[2] for s in ("top1", "top5", "acc"))),
)


def history_series(records: list[Record]) -> dict[str, tuple[list[int], list[float]]]:
    """Per key, the (steps, values) in step order; a step logged twice keeps its last value."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("t") == "m":
            for k, v in r["v"].items():
                by_key.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: (sorted(pts), [pts[s] for s in sorted(pts)]) for k, pts in by_key.items()}


def render_history_plot(records: list[Record], out: Path, *, title: str) -> Path | None:
    """Write a PNG with a loss panel and an accuracy panel; ``None`` when there is nothing to draw."""
    series = history_series(records)
    panels = [(name, [k for k in sorted(series) if pick(k)]) for name, pick in _PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            steps, values = series[k]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
