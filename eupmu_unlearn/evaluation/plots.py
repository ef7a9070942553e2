"""The trade-off figure of a benchmark record (PNG, matplotlib's non-interactive backend).

Left: forget accuracy (100 - UA) against retain accuracy (RA) for every method, mean ± std over
seeds, with the retrained and the original models marked and EUPMU's path over the unlearning
steps (first seed). Middle: the same, zoomed around the retrained model. Right: EUPMU's
multiplier w and its forget/retain accuracy over the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..methods import EUPMU_PRESETS

TRAJECTORY_METHODS = ("eupmu", *EUPMU_PRESETS)


def plot_tradeoff(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _method_colors(record, plt)
    fig, (ax_all, ax_zoom, ax_steps) = plt.subplots(1, 3, figsize=(17, 5))
    _draw_tradeoff(ax_all, record, colors, legend=True)
    ax_all.set_title("forget vs retain accuracy (star: retrained model)")
    _draw_tradeoff(ax_zoom, record, colors, legend=False)
    _zoom_on_retrained(ax_zoom, record)
    ax_zoom.set_title("zoom around the retrained model")
    _draw_steps(ax_steps, record, colors)
    fig.suptitle(f"{record['config']['dataset']} ({record['config']['architecture']}): {record['scenario']}, "
                 f"mean ± std over {len(record['config']['seeds'])} seed(s)")
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _method_colors(record: dict[str, Any], plt) -> dict[str, Any]:
    palette = plt.get_cmap("tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(record["methods"])}


def _point(row: dict[str, Any]) -> tuple[float, float, float, float]:
    mean, std = row["mean"], row["std"]
    return mean["RA"], 100.0 - mean["UA"], std.get("RA", 0.0), std.get("UA", 0.0)


def _draw_tradeoff(ax, record: dict[str, Any], colors: dict[str, Any], legend: bool) -> None:
    for name, row in record["methods"].items():
        x, y, dx, dy = _point(row)
        marker = "o" if name in TRAJECTORY_METHODS else "s"
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=marker, ms=7, capsize=2, color=colors[name], label=name, zorder=4)
    for name, style in (("retrain", dict(marker="*", ms=18, color="gold", mec="black", alpha=0.75)),
                        ("original", dict(marker="X", ms=11, color="gray", mec="black"))):
        x, y, _, _ = _point(record["reference"][name])
        ax.plot([x], [y], linestyle="none", label=name, zorder=6, **style)
    for name in TRAJECTORY_METHODS:
        path = record.get("trajectories", {}).get(name)
        if name in record["methods"] and path and path.get("step"):
            ax.plot(path["retain_acc"], path["forget_acc"], "-", lw=1, alpha=0.6, color=colors[name],
                    marker=".", ms=4, label=f"{name}: path over the steps (seed {path['seed']})", zorder=3)
    ax.set_xlabel("retain accuracy RA (%)")
    ax.set_ylabel("forget accuracy 100 - UA (%)")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, ncol=2, loc="best")


def _zoom_on_retrained(ax, record: dict[str, Any]) -> None:
    x, y, _, _ = _point(record["reference"]["retrain"])
    ax.set_xlim(max(0.0, x - 3.0), min(100.5, x + 1.0))
    ax.set_ylim(max(-1.0, y - 8.0), min(101.0, y + 8.0))


def _draw_steps(ax, record: dict[str, Any], colors: dict[str, Any]) -> None:
    trajectories = record.get("trajectories", {})
    shown = [n for n in TRAJECTORY_METHODS if n in trajectories and "w" in trajectories[n]]
    if not shown:
        ax.text(0.5, 0.5, "no EUPMU trajectory in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    acc_ax = ax.twinx()
    for name in shown:
        path, color = trajectories[name], colors[name]
        ax.plot(range(1, len(path["w"]) + 1), path["w"], lw=1.4, color=color, label=f"{name}: w")
        acc_ax.plot(path["step"], path["forget_acc"], "--", lw=1, color=color, label=f"{name}: forget acc")
        acc_ax.plot(path["step"], path["retain_acc"], ":", lw=1.4, color=color, label=f"{name}: retain acc")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("multiplier w (solid)")
    acc_ax.set_ylabel("accuracy (%): forget dashed, retain dotted")
    ax.set_title(f"EUPMU over the steps (seed {trajectories[shown[0]]['seed']})")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = acc_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
