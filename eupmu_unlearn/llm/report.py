"""Results of the LLM benchmark: ``results.json``, a markdown table and the trade-off figure."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..cli_args import atomic_path, write_text_atomic
from ..memory import FIELD as MEMORY_FIELD
from ..tables import markdown_table as render

REFERENCE_ROWS = ("target", "oracle")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and 0 < abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in record["models"].items():
        m = entry["metrics"]
        usage = entry.get("unlearn", {})
        rows.append({
            "model": name, "forget_quality": m["forget_quality"], "model_utility": m["model_utility"],
            "forget_prob": m["forget"]["probability"], "forget_rouge": m["forget"]["rouge_l"],
            "forget_key": m["forget"]["key_hit_rate"], "retain_prob": m["retain"]["probability"],
            "retain_rouge": m["retain"]["rouge_l"], "world_rouge": m["world"]["rouge_l"],
            "seconds": usage.get("seconds"), MEMORY_FIELD: usage.get(MEMORY_FIELD),
        })
    return rows


def markdown_table(record: dict[str, Any]) -> str:
    cfg = record["config"]
    header = ["model", "forget quality ↑", "model utility ↑", "forget prob", "forget ROUGE-L", "forget facts stated",
              "retain prob", "retain ROUGE-L", "world ROUGE-L", "unlearn time (s)", "peak tensor memory (MiB)"]
    body = [[r["model"], _fmt(r["forget_quality"]), _fmt(r["model_utility"]), _fmt(r["forget_prob"]),
             _fmt(r["forget_rouge"]), _fmt(r["forget_key"], 2), _fmt(r["retain_prob"]), _fmt(r["retain_rouge"]),
             _fmt(r["world_rouge"]), _fmt(r["seconds"], 1), _fmt(r[MEMORY_FIELD], 0)] for r in table_rows(record)]
    env = record["environment"]
    un = cfg["unlearn"]
    lines = [render(header, body), ""]
    lines.append(f"Seed {cfg['seed']} (data, fine-tuning and unlearning); {record['data']['n_forget']} forget / "
                 f"{record['data']['n_retain']} retain questions; unlearning: {un['steps']} AdamW steps at lr "
                 f"{un['lr']:g}, EUPMU forget loss {un['eupmu_forget_loss']}; {env['model']} "
                 f"({env['parameters'] / 1e6:.1f}M parameters) on {env['device']} with {env['threads']} threads; "
                 f"fine-tuning: {_finetune_note(record)}; whole run {record['total_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def _finetune_note(record: dict[str, Any]) -> str:
    parts = []
    for which in ("target", "oracle"):
        info = record.get(f"{which}_finetune", {})
        parts.append(f"{which} cached" if info.get("cached") else f"{which} {info.get('seconds', 0.0):.0f} s")
    return ", ".join(parts)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(record)
    fig, (ax_trade, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP<>Xh"
    for i, r in enumerate(rows):
        quality = max(r["forget_quality"] or 1e-12, 1e-12)
        if r["model"] in REFERENCE_ROWS:
            ax_trade.scatter(r["model_utility"], quality, marker="*", s=160, color="black", zorder=3)
            ax_trade.annotate(r["model"], (r["model_utility"], quality), textcoords="offset points",
                              xytext=(6, 4), fontsize=8)
        else:  # methods often land on the same point: a legend keeps them apart
            ax_trade.scatter(r["model_utility"], quality, marker=markers[i % len(markers)], s=55, alpha=0.8,
                             label=r["model"], zorder=3)
    ax_trade.legend(fontsize=7, loc="lower left")
    ax_trade.set_yscale("log")
    ax_trade.set_xlabel("model utility (higher is better)")
    ax_trade.set_ylabel("forget quality, KS p-value (higher is better)")
    ax_trade.set_title("Forget quality vs model utility")
    ax_trade.grid(True, alpha=0.3)

    methods = [r for r in rows if r["seconds"] is not None]
    ax_time.bar([r["model"] for r in methods], [r["seconds"] for r in methods], color="tab:blue")
    for i, r in enumerate(methods):
        if r[MEMORY_FIELD] is not None:
            ax_time.annotate(f"{r[MEMORY_FIELD]:.0f} MiB", (i, r["seconds"]), ha="center", va="bottom", fontsize=8)
    ax_time.set_ylabel("unlearning wall time (s)")
    ax_time.set_title("Cost per method (label: peak tensor memory)")
    ax_time.tick_params(axis="x", rotation=30)
    fig.suptitle(f"mini-TOFU unlearning, {record['environment']['model']}, seed {record['config']['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(record: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, ``table.md`` and ``tradeoff.png``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps(record, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "table.md", markdown_table(record))
    with atomic_path(out_dir / "tradeoff.png") as tmp:
        plot(record, tmp)
