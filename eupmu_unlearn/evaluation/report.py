"""Text renderings of a benchmark record: the metrics table and the target check."""

from __future__ import annotations

import math
from typing import Any

from ..memory import FIELD as MEMORY_FIELD
from ..methods import BASELINES
from ..tables import markdown_table as render

COLUMNS = (("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA", "MIA"), ("gap", "Avg. gap ↓"),
           ("RTE", "RTE (s)"), (MEMORY_FIELD, "Peak tensor memory (MiB)"))
DECIMALS = {"RTE": 2, MEMORY_FIELD: 3}


# Top-level keys that identify the JSON files the project's other tools write.
OTHER_KINDS = ((("records", "machine"), "an eupmu-bench result"),
               (("models", "environment"), "an eupmu-unlearn-llm result"),
               (("selections",), "a hyperparameter selection (written by eupmu-unlearn sweep)"))
ROW_KEYS = ("label", "per_seed", "mean", "std")


def record_problem(data: Any) -> str | None:
    """Why ``data`` (parsed JSON) is not an ``eupmu-unlearn`` result record, or None if it is one."""
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not an eupmu-unlearn result"
    for keys, kind in OTHER_KINDS:
        if all(key in data for key in keys):
            return f"is {kind}, not an eupmu-unlearn result"
    missing = [key for key in ("config", "scenario", "reference", "methods") if key not in data]
    if missing:
        return f"is not an eupmu-unlearn result (no {', '.join(map(repr, missing))})"
    config = data["config"]
    if not isinstance(config, dict) or not all(k in config for k in ("dataset", "architecture", "seeds")):
        return "is not an eupmu-unlearn result ('config' lacks dataset, architecture or seeds)"
    for section in ("reference", "methods"):
        rows_ = data[section]
        if not isinstance(rows_, dict) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS)
                                                 for r in rows_.values()):
            return f"is not an eupmu-unlearn result (malformed {section!r} rows)"
    return None


def rows(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [*record["reference"].items(), *record["methods"].items()]


def format_cell(row: dict[str, Any], key: str) -> str:
    mean = row["mean"].get(key)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    digits = DECIMALS.get(key, 2)
    std = row["std"].get(key)
    if len(row["per_seed"]) > 1 and std is not None:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def markdown_table(record: dict[str, Any]) -> str:
    """Mean ± std over seeds per method; the smallest average gap among methods in bold."""
    gaps = {name: row["mean"].get("gap", math.inf) for name, row in record["methods"].items()}
    best = min(gaps, key=lambda name: gaps[name]) if gaps else None
    body = []
    for name, row in rows(record):
        cells = [format_cell(row, key) for key, _ in COLUMNS]
        if name == best:
            cells[4] = f"**{cells[4]}**"
        body.append([f"{row['label']} (`{name}`)", *cells])
    return render(["Method", *(title for _, title in COLUMNS)], body)


def target_check(record: dict[str, Any], method: str) -> list[str]:
    """The unlearning-quality target of the specification, checked on mean values.

    UA within 2 points of the retrained model's, RA and TA within 1 point, and a smaller average
    gap than every baseline present in the record.
    """
    if method not in record["methods"]:
        return []
    mine, gold = record["methods"][method]["mean"], record["reference"]["retrain"]["mean"]
    lines = []
    for key, limit in (("UA", 2.0), ("RA", 1.0), ("TA", 1.0)):
        diff = mine[key] - gold[key]
        verdict = "ok" if abs(diff) <= limit else "MISSED"
        lines.append(f"{key}: {mine[key]:.2f} vs retrained {gold[key]:.2f} "
                     f"(diff {diff:+.2f}, limit ±{limit:g}) {verdict}")
    for name in BASELINES:
        if name in record["methods"]:
            other = record["methods"][name]["mean"]["gap"]
            verdict = "better" if mine["gap"] < other else "NOT better"
            lines.append(f"avg gap {mine['gap']:.2f} vs {name} {other:.2f}: {verdict}")
    return lines
