"""The results table, the speed-target check, and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from eupmu_unlearn.tables import markdown_table as render

Record = dict[str, Any]

COLUMNS: list[tuple[str, Callable[[Record], str]]] = [
    ("model", lambda r: r["model"]),
    ("N", lambda r: f"{r['numel']:.2e}"),
    ("dtype", lambda r: r["dtype"] if r["state_dtype"] == r["dtype"] else f"{r['dtype']}/{r['state_dtype']}"),
    ("method", lambda r: r["method"]),
    ("backend", lambda r: r["backend"] if r["kind"] == "ours" else "-"),
    ("ms/step", lambda r: f"{r['median_ms']:.3g}"),
    ("GB/s", lambda r: f"{r['gbps']:.1f}"),
    ("B/param", lambda r: str(r["bytes_per_param"])),
    ("of copy BW", lambda r: f"{100 * r['bandwidth_fraction']:.0f}%"),
    ("x AdamW", lambda r: _ratio(r.get("vs_fused_adamw"))),
    ("naive/this", lambda r: _ratio(r.get("speedup_vs_naive"))),
    ("syncs", lambda r: "n/a" if r["host_syncs"] is None else str(r["host_syncs"])),
    ("peak tensor memory", lambda r: _grads(r["peak_tensor_grads"])),
    ("held", lambda r: _grads(r["held_grads"])),
]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _grads(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} g"


def markdown_table(records: list[Record]) -> str:
    return render([name for name, _ in COLUMNS], ([fmt(r) for _, fmt in COLUMNS] for r in records))


def targets(records: list[Record]) -> list[dict[str, Any]]:
    """The speed targets, per (model, size, dtype, backend) of our optimizer. Measured, never asserted."""
    checks: list[dict[str, Any]] = []

    def check(r: Record, name: str, value: float | int | None, goal: str, met: bool | None) -> None:
        checks.append({"model": r["model"], "numel": r["numel"], "dtype": r["dtype"], "backend": r["backend"],
                       "target": name, "value": value, "goal": goal, "met": met})

    for r in records:
        if r["method"] == "eupmu-explicit":
            ratio, speedup = r.get("vs_fused_adamw"), r.get("speedup_vs_naive")
            check(r, "explicit time / fused AdamW", ratio, "<= 1.5", None if ratio is None else ratio <= 1.5)
            check(r, "fastest naive / explicit", speedup, ">= 4", None if speedup is None else speedup >= 4)
            frac = r["bandwidth_fraction"]
            check(r, "explicit share of copy bandwidth", frac, ">= 0.8", frac >= 0.8)
        if r["method"] in ("eupmu-implicit", "eupmu-implicit-noguard"):
            ratio = r.get("vs_fused_adamw")
            check(r, f"{r['method']} time / fused AdamW", ratio, "<= 1.05", None if ratio is None else ratio <= 1.05)
            syncs = r["host_syncs"]
            check(r, f"{r['method']} host syncs", syncs, "0", None if syncs is None else syncs == 0)
    return checks


def largest_size_only(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    largest: dict[tuple, int] = {}
    for c in checks:
        key = (c["model"], c["dtype"])
        largest[key] = max(largest.get(key, 0), c["numel"])
    return [c for c in checks if c["numel"] == largest[(c["model"], c["dtype"])]]


def format_targets(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[c["met"]]
        value = "n/a" if c["value"] is None else (f"{c['value']:.3g}" if isinstance(c["value"], float)
                                                  else str(c["value"]))
        lines.append(f"{c['model']} {c['numel']:.2e} {c['dtype']} [{c['backend']}] {c['target']}: "
                     f"{value} (goal {c['goal']}): {verdict}")
    return "\n".join(lines)


def format_skipped(skipped: list[dict[str, str]]) -> str:
    return "\n".join(("FAILED " if s.get("failed") else "skipped ")
                     + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("reason", "failed"))
                     + f": {s['reason']}" for s in skipped)


def _load(load: dict[str, float | None]) -> str:
    if load["start"] is None:
        return "unknown"
    return f"{load['start']:.2f} at the start, {load['end']:.2f} at the end"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def markdown_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    cpu = f"{m['cpu_model']}, {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads"
    where = f"{m['gpu']} ({cpu})" if m.get("gpu") else cpu
    bw = results["bandwidth"]
    lines = [
        f"- date: {m['date']}",
        f"- machine: {where}; torch {m['torch']}, triton {m['triton']}, Python {m['python']}",
        f"- command: `{results['command']}`",
        f"- copy bandwidth ceiling: {bw['ceiling_gbps']:.1f} GB/s ({bw['start']['kernel']}, "
        f"{bw['start']['bytes_per_element']} B/elem, {bw['start']['numel']:.1e} elements)",
        f"- memory: {results['memory_source']}",
        f"- 1-minute load average: {_load(results['load_average'])} ({m['cpu_count']} CPUs; "
        "a load above the CPU count means other work disturbed the timings)",
        "",
        markdown_table(results["records"]),
    ]
    if results["skipped"]:
        lines += ["", *("- " + line for line in format_skipped(results["skipped"]).splitlines())]
    return "\n".join(lines) + "\n"
