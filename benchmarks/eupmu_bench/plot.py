"""Time per step against the number of parameters, log-log, one line per method and backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Record = dict[str, Any]

# Colour per method, line style per kernel backend (baselines dashed).
BACKEND_STYLES = {"native": "-", "triton": "-.", "torch": ":"}
BASELINE_STYLE = "--"


def _label(r: Record) -> str:
    return r["method"] if r["kind"] != "ours" else f"{r['method']} [{r['backend']}]"


def _style(r: Record) -> str:
    return BACKEND_STYLES.get(r["backend"], "-") if r["kind"] == "ours" else BASELINE_STYLE


def _panels(records: list[Record]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        seen[(r["model"], r["dtype"])] = None
    return list(seen)


def plot_step_times(records: list[Record], path: Path, title: str) -> bool:
    """Write the PNG; False (nothing written) when matplotlib is not installed or no records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = _panels(records)
    if not panels:
        return False
    methods = list(dict.fromkeys(r["method"] for r in records))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 3, 4.8), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels):
        lines: dict[str, list[Record]] = {}
        for r in records:
            if (r["model"], r["dtype"]) == (model, dtype):
                lines.setdefault(_label(r), []).append(r)
        for label, points in lines.items():
            points.sort(key=lambda r: r["numel"])
            first = points[0]
            ax.plot([r["numel"] for r in points], [r["median_ms"] for r in points], _style(first),
                    color=colours[first["method"]], marker="o", markersize=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("median time per step (ms)")
        ax.set_title(f"{model}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
