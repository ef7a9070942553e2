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


# ---------------------------------------------------------------------------------- several seeds

SUMMARY_FIELDS = ("forget_quality", "model_utility", "utility_change", "forget_prob", "forget_rouge", "forget_key",
                  "retain_prob", "retain_rouge", "world_rouge", "seconds", MEMORY_FIELD)


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value) of finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "values": list(values)}
    mean = math.fsum(finite) / len(finite)
    if len(finite) == 1 or all(v == finite[0] for v in finite):
        return {"mean": finite[0] if len(set(finite)) == 1 else mean, "std": 0.0, "values": list(values)}
    var = math.fsum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return {"mean": mean, "std": math.sqrt(var), "values": list(values)}


def aggregate(cfg: Any, records: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per model and metric: the per-seed values, their mean and standard deviation.

    ``utility_change`` is a model's utility minus the target's of the same seed."""
    if not records:
        raise ValueError("nothing to aggregate: no seed records")
    per_seed = {seed: {r["model"]: r for r in table_rows(record)} for seed, record in records.items()}
    models = list(next(iter(per_seed.values())))
    summary: dict[str, dict[str, Any]] = {}
    for name in models:
        rows = [per_seed[seed][name] for seed in per_seed]
        targets = [per_seed[seed]["target"]["model_utility"] for seed in per_seed]
        for row, target in zip(rows, targets):
            row["utility_change"] = row["model_utility"] - target
        summary[name] = {key: mean_std([row[key] for row in rows]) for key in SUMMARY_FIELDS}
    first = next(iter(records.values()))
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    config["seeds"] = list(records)
    return {"config": config, "environment": first["environment"], "seeds": list(records),
            "data": {seed: r["data"] for seed, r in records.items()}, "summary": summary,
            "per_seed": {seed: {name: {k: row.get(k) for k in SUMMARY_FIELDS} for name, row in rows.items()}
                         for seed, rows in per_seed.items()},
            "traces": {seed: {name: entry.get("trace") for name, entry in r["models"].items() if "trace" in entry}
                       for seed, r in records.items()},
            "total_seconds": seconds}


def _pm(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"


def aggregate_table(record: dict[str, Any]) -> str:
    header = ["model", "forget quality ↑", "model utility ↑", "utility − target", "forget prob", "forget ROUGE-L",
              "forget facts stated", "retain prob", "retain ROUGE-L", "world ROUGE-L", "unlearn time (s)"]
    body = []
    for name, s in record["summary"].items():
        body.append([name, _pm(s["forget_quality"]), _pm(s["model_utility"]),
                     "–" if name == "target" else _pm(s["utility_change"]), _pm(s["forget_prob"]),
                     _pm(s["forget_rouge"]), _pm(s["forget_key"], 2), _pm(s["retain_prob"]), _pm(s["retain_rouge"]),
                     _pm(s["world_rouge"]), _pm(s["seconds"], 1)])
    cfg, env = record["config"], record["environment"]
    un = cfg["unlearn"]
    seeds = ", ".join(str(s) for s in record["seeds"])
    data = next(iter(record["data"].values()))
    lines = [render(header, body), ""]
    lines.append(f"Mean ± standard deviation (n − 1) over seeds {seeds} (data, fine-tuning and unlearning), "
                 f"{cfg['split']} split; {data['n_forget']} forget / {data['n_retain']} retain questions per seed; "
                 f"unlearning: AdamW, {un['steps']} steps at lr {un['lr']:g} unless a method's own values say "
                 f"otherwise ({_per_method_note(un, record['summary'])}){_dual_note(un)}; EUPMU forget loss "
                 f"{un['eupmu_forget_loss']}; {_model_name(record)} "
                 f"({env['parameters'] / 1e6:.2f}M parameters) on {env['device']} with {env['threads']} threads; "
                 f"whole run {record['total_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def _dual_note(unlearn: dict[str, Any]) -> str:
    return "" if unlearn.get("dual_lr") is None else f"; dual_lr {unlearn['dual_lr']:g} for every implicit method"


def _model_name(record: dict[str, Any]) -> str:
    cfg = record["config"]
    if cfg.get("model") == "tiny":
        return f"tiny Llama (hidden {cfg['tiny']['hidden_size']}, {cfg['tiny']['layers']} layers, word-level codec)"
    return record["environment"]["model"]


def _per_method_note(unlearn: dict[str, Any], shown: Any = None) -> str:
    own = {name: values for name, values in (unlearn.get("per_method") or {}).items()
           if shown is None or name in shown}
    if not own:
        return "none"
    return "; ".join(f"{name}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in values.items()) for name, values in own.items())


def aggregate_plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = "osD^vP<>Xh"
    for i, (name, s) in enumerate(record["summary"].items()):
        u, q = s["model_utility"], s["forget_quality"]
        if u["mean"] is None or q["mean"] is None:
            continue
        style = dict(marker="*", markersize=12, color="black") if name in REFERENCE_ROWS else \
            dict(marker=markers[i % len(markers)], markersize=7, alpha=0.85)
        ax.errorbar(u["mean"], q["mean"], xerr=u["std"], yerr=q["std"], linestyle="none", capsize=3,
                    label=name, **style)
        if name in REFERENCE_ROWS:
            ax.annotate(name, (u["mean"], q["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    target = record["summary"].get("target", {}).get("model_utility", {}).get("mean")
    if target is not None:
        ax.axvline(target - 0.01, color="grey", linestyle="--", linewidth=1, label="target utility − 0.01")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    seeds = ", ".join(str(s) for s in record["seeds"])
    ax.set_title(f"mini-TOFU, {_model_name(record)}: mean ± std over seeds {seeds}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_aggregate(record: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, ``table.md`` and ``tradeoff.png`` of a several-seed run, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps(record, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "table.md", aggregate_table(record))
    with atomic_path(out_dir / "tradeoff.png") as tmp:
        aggregate_plot(record, tmp)


def multiplier_plot(runs: dict[str, tuple[dict[str, Any], str]], path: Path) -> None:
    """w and the forget loss per step in several-seed records (label -> (record, method)), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_f) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (record, method)) in enumerate(runs.items()):
        for j, (seed, traces) in enumerate(record["traces"].items()):
            trace = traces.get(method)
            if trace is None:
                raise ValueError(f"{label!r} has no trace of method {method!r}")
            steps = range(1, len(trace["multiplier"]) + 1)
            kw = dict(color=colours[i % len(colours)], alpha=0.8, label=label if j == 0 else None)
            ax_w.plot(steps, trace["multiplier"], marker=".", **kw)
            ax_f.plot(steps, trace["forget_loss"], marker=".", **kw)
    ax_w.set_yscale("symlog", linthresh=1e-2)
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("multiplier w after the step")
    ax_f.set_xlabel("step")
    ax_f.set_ylabel("forget loss (NPO) at the step")
    for ax in (ax_w, ax_f):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("implicit EUPMU: multiplier and forget loss per step, one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m eupmu_unlearn.llm.report OUT.png LABEL=RESULTS.json:METHOD ...``: the multiplier plot."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or any("=" not in a or ":" not in a for a in args[1:]):
        print("usage: python -m eupmu_unlearn.llm.report OUT.png LABEL=RESULTS.json:METHOD [...]")
        return 2
    runs = {}
    for item in args[1:]:
        label, rest = item.split("=", 1)
        file, method = rest.rsplit(":", 1)
        runs[label] = (json.loads(Path(file).read_text()), method)
    with atomic_path(Path(args[0])) as tmp:
        multiplier_plot(runs, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
