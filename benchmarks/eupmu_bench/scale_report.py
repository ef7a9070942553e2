"""Tables and the memory plot of ``eupmu-bench scale`` (results of :mod:`eupmu_bench.scale`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from eupmu_unlearn.tables import markdown_table

from .scale import FLOOR, GIB

Result = dict[str, Any]


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _numel(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _check(rec: Result) -> str:
    check = rec.get("check")
    if check is None:
        return "n/a"
    text = "pass" if check["passed"] else "FAIL"
    if "lambda_rel_error" in check:
        text += f" (λ* {check['lambda']:.3g})"
    return text


def method_table(result: Result) -> str:
    rows = []
    for r in result["records"]:
        if "numel" not in r:
            why = r.get("skipped") or f"FAILED: {r.get('failed')}"
            rows.append([_numel(r["requested_numel"]), r["method"], *["-"] * 9, why])
            continue
        excess = r.get("excess_over_floor_grads")
        rows.append([
            _numel(r["numel"]), r["method"], f"{r['iteration_s']:.2f}", f"{r['iteration_cpu_s']:.2f}",
            f"{r['step_s']:.2f}",
            f"{100 * r['step_share']:.0f}%", "-" if "iteration_vs_floor" not in r else f"{r['iteration_vs_floor']:.2f}",
            _gib(r["peak_rss_bytes"]), "-" if excess is None else f"{excess:+.2f}",
            _gib(r.get("tensor_peak_bytes")),
            f"{_gib(r['bytes_model_peak_bytes'])} ({r['bytes_model_per_param']} B/param)",
            _check(r),
        ])
    return markdown_table(["N", "method", "s/iteration", "CPU s/iteration", "step s", "step share", "x floor",
                           "peak GiB",
                           "above floor (bf16 grads)", "peak tensor GiB", "bytes model GiB", "check"], rows)


def fit_table(result: Result) -> str:
    memories = list(result["config"]["fit_memory_gib"])
    machine = result.get("machine_memory_bytes")
    header = ["method", "measured B/param", "fixed GiB", "bytes model B/param",
              *(f"largest N in {m:g} GiB" for m in memories)]
    if machine:
        header.append(f"largest N here ({machine / GIB:.1f} GiB)")
    header.append("check at a larger N: predicted / measured")
    rows = []
    for f in result["fits"]:
        model = sum(result["bytes_model"][f["method"]].values())
        row = [f["method"], f"{f['bytes_per_param']:.2f}", f"{f['intercept_bytes'] / GIB:.2f}", str(model),
               *(_numel(f["largest_numel"][f"{m:g} GiB"]) for m in memories)]
        if machine:
            row.append(_numel(f.get("largest_numel_this_machine")))
        check = f.get("check")
        if check is None:
            row.append("-")
        elif "not_run" in check:
            row.append(f"{_numel(check['numel'])}: not run ({check['not_run']})")
        else:
            row.append(f"{_numel(check['numel'])}: {_gib(check['predicted_bytes'])} / {_gib(check['measured_bytes'])} "
                       f"GiB ({100 * check['error']:+.1f}%)")
        rows.append(row)
    return markdown_table(header, rows)


def target_lines(result: Result) -> list[str]:
    """The issue's memory targets, per size where both sides ran (measured, informative)."""
    lines = []
    sizes: dict[int, dict[str, Result]] = {}
    for r in result["records"]:
        if "numel" in r:
            sizes.setdefault(r["requested_numel"], {})[r["method"]] = r
    for numel, group in sorted(sizes.items()):
        if FLOOR not in group:
            continue
        explicit, naive = group.get("eupmu-explicit"), group.get("naive")
        if explicit is not None:
            e = explicit["excess_over_floor_grads"]
            lines.append(f"- {numel:.3g}: EUPMU explicit peak - AdamW (fp32 moments) peak = {e:+.2f} bf16 gradients "
                         f"(target <= 1): {'met' if e <= 1.0 else 'MISSED'}")
        if naive is not None:
            lines.append(f"- {numel:.3g}: naive surgery peak - AdamW (fp32 moments) peak = "
                         f"{naive['excess_over_floor_grads']:+.2f} bf16 gradients (expected >= 3)")
    return lines


def fsdp_section(fsdp: Result | None) -> list[str]:
    if fsdp is None:
        return []
    if "skipped" in fsdp or "failed" in fsdp:
        return ["## FSDP2", "", f"not run: {fsdp.get('skipped') or fsdp.get('failed')}"]
    from .scale_fsdp import format_fsdp

    cfg, shape = fsdp["config"], fsdp["shape"]
    return ["## FSDP2", "",
            f"- command: `{fsdp.get('command', '')}`",
            f"- model: {shape['numel']:,} parameters ({shape['layers']} layers x {shape['hidden']}), bf16, "
            f"{fsdp['world']} ranks ({fsdp['backend']}), {cfg['threads']} torch thread(s) per rank, "
            f"global batch {cfg['batch']} x {cfg['seq']} tokens",
            "- replicated: every rank the whole batch (must be bit-identical to the single process); split: rows "
            "per rank (bound: 2 lr + one bf16 spacing per weight)", "",
            format_fsdp(fsdp)]


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _disturbed(load: dict[str, float | None], cpus: int | None) -> str:
    values = [v for v in (load.get("start"), load.get("end")) if v is not None]
    if cpus and values and max(values) > cpus:
        return (f" (**disturbed**: other work kept more than {cpus} CPUs busy, so the timings are not evidence, "
                "nor are CPU seconds with more than one thread, which spin while waiting for each other; memory "
                "is unaffected)")
    return ""


def markdown(result: Result) -> str:
    m = result["machine"]
    cfg = result["config"]
    load = result.get("load_average", {})
    lines = [
        "# eupmu-bench scale", "",
        f"- date: {m['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPU cores, {_gib(result.get('machine_memory_bytes'))} GiB "
        f"memory; torch {m['torch']}, transformers {result.get('transformers')}, Python {m['python']}",
        f"- command: `{result['command']}`",
        f"- model: Llama (transformers LlamaConfig), random weights, bf16 weights and gradients, fp32 AdamW "
        f"moments (adamw-torch: bf16); batch {cfg['batch']} x {cfg['seq']} tokens per side; "
        f"{cfg['warmup']} warm-up + {cfg['iterations']} timed iterations per method; lr {cfg['lr']:g}",
        f"- threads: {result.get('threads')}; 1-minute load average {_load(load.get('start'))} at the start, "
        f"{_load(load.get('end'))} at the end{_disturbed(load, m['cpu_count'])}",
        f"- peak memory: {result['memory_probe']}",
        f"- wall time of the whole run: {result.get('wall_s', float('nan')) / 60:.1f} min", "",
        method_table(result), "",
    ]
    targets = target_lines(result)
    if targets:
        lines += ["Memory targets (measured, informative):", "", *targets, ""]
    if result["fits"]:
        lines += ["## Largest model that fits", "",
                  "peak = fixed + (B/param) x N through the two smallest sizes; N is the parameter count of the "
                  "largest model whose predicted peak fits the memory.", "", fit_table(result), ""]
    lines += fsdp_section(result.get("fsdp"))
    return "\n".join(lines).rstrip() + "\n"


def plot_memory(result: Result, path: Path) -> bool:
    """Peak memory per method (bars per size, bytes-model markers) and the fitted lines with the
    memory sizes they are read against; False when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in result["records"] if "numel" in r]
    if not done:
        return False
    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    sizes = sorted({r["requested_numel"] for r in done})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(methods)}
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(methods)
    for i, name in enumerate(methods):
        for j, numel in enumerate(sizes):
            rec = next((r for r in done if r["method"] == name and r["requested_numel"] == numel), None)
            x = j + (i - (len(methods) - 1) / 2) * width
            if rec is None:
                bars.text(x, 0, "x", ha="center", va="bottom", color=colours[name], fontsize=9)
                continue
            bars.bar(x, rec["peak_rss_bytes"] / GIB, width, color=colours[name], label=name if j == 0 else None)
            bars.plot(x, rec["bytes_model_peak_bytes"] / GIB, "k_", markersize=12)
    bars.set_xticks(range(len(sizes)), [f"{n:.3g}" for n in sizes])
    bars.set_xlabel("parameters (requested)")
    bars.set_ylabel("peak resident memory (GiB)")
    bars.set_title("measured peak per method (black: bytes model; x: not run)", fontsize=9)
    bars.legend(fontsize=8)
    top = max([result.get("machine_memory_bytes") or 0] + [r["peak_rss_bytes"] for r in done]) / GIB
    memories = [m for m in result["config"]["fit_memory_gib"]]
    n_max = max(sizes) * 3
    for f in result["fits"]:
        for m in memories:
            n = f["largest_numel"][f"{m:g} GiB"]
            if n is not None:
                n_max = max(n_max, n * 1.1)
    grid = [10 ** (6 + k * (math.log10(n_max) - 6) / 200) for k in range(201)]
    for f in result["fits"]:
        name = f["method"]
        lines.plot(grid, [(f["intercept_bytes"] + f["bytes_per_param"] * n) / GIB for n in grid], "-",
                   color=colours[name], label=f"{name}: {f['bytes_per_param']:.1f} B/param")
        pts = [r for r in done if r["method"] == name]
        lines.plot([r["numel"] for r in pts], [r["peak_rss_bytes"] / GIB for r in pts], "o", color=colours[name])
    machine = result.get("machine_memory_bytes")
    for m in memories:
        lines.axhline(m, color="grey", linestyle=":", linewidth=1)
        lines.text(grid[0], m, f" {m:g} GiB", va="bottom", fontsize=7, color="grey")
    if machine:
        lines.axhline(machine / GIB, color="black", linestyle="--", linewidth=0.8)
        lines.text(grid[-1], machine / GIB, f"this machine: {machine / GIB:.1f} GiB ", va="top", ha="right",
                   fontsize=7)
    lines.set_xscale("log")
    lines.set_yscale("log")
    lines.set_ylim(0.5, max(top, max(memories)) * 1.5)
    lines.set_xlabel("parameters")
    lines.set_ylabel("peak resident memory (GiB)")
    lines.set_title("fit through the two smallest sizes, extrapolated (dots: measured)", fontsize=9)
    lines.grid(True, which="both", alpha=0.3)
    lines.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu_model']}: {result['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

