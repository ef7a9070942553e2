"""Choosing the LLM benchmark's per-method hyperparameters on the validation split.

The validation split's authors come from a surname pool disjoint from the reported (test) ones
(:func:`eupmu_unlearn.llm.data.make_mini_tofu`), and its seeds are separate runs. Every method
gets the same budget: a small grid over its learning rate and its own knob, each point run on
every validation seed. The rule is the benchmark's target, applied to every method alike: the
highest mean forget quality among the points whose mean model utility stays within
``UTILITY_SLACK`` of the target model's; ties (forget quality moves on a coarse grid of KS
p-values) go to the higher utility. A method with no such point gets its highest-utility point.

``python -m eupmu_unlearn.llm.tuning --out DIR`` runs the search on the tiny model and writes
``DIR/validation.json`` (every point) and ``DIR/llm_tiny_tuned.json`` (the selection, in the
format of the package data file ``eupmu_unlearn/data/llm_tiny_tuned.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import cli_args
from . import tofu
from .codec import Codec
from .data import MiniTofu, QAItem
from .pipeline import (PipelineConfig, evaluate, finetuned, make_data, model_entry, rehearsal_set, retain_eval_items,
                       run_method, tiny_base, tiny_config)

UTILITY_SLACK = 0.01
DUAL_PRESETS = ("reference", "paper")
VALIDATION_SEEDS = (100, 101)

LRS = (1e-4, 3e-4, 1e-3)
# method -> {option: values}; every method also sweeps LRS
GRID: dict[str, dict[str, tuple[Any, ...]]] = {
    "ga": {},
    "graddiff": {"graddiff_alpha": (1.0, 3.0)},
    "npo": {},
    "npo-graddiff": {"graddiff_alpha": (1.0, 3.0)},
    "simnpo": {"graddiff_alpha": (1.0, 3.0), "simnpo_beta": (2.5,)},
    "eupmu-reference": {"dual_lr": (0.01, 0.03, 0.1, 0.3, 1.0)},
    "eupmu-paper": {"dual_lr": (0.01, 0.1, 1.0), "w_init": (0.0, 3.0)},
    "ungrad": {"tolerance": (0.0, 0.1)},
    "ungrad-update": {"tolerance": (0.0, 0.1)},
}


@dataclass
class Prepared:
    """One seed's data, target model and oracle truth ratios, ready for unlearning runs."""

    cfg: PipelineConfig
    data: MiniTofu
    codec: Codec
    target: torch.nn.Module
    splits: dict[str, Sequence[QAItem]]
    oracle_ratios: list[float]
    target_metrics: dict[str, Any]
    oracle_metrics: dict[str, Any]


def prepare(cfg: PipelineConfig, cache_dir: Path) -> Prepared:
    data = make_data(cfg)
    base = tiny_base(data, cfg)
    rehearsal = rehearsal_set(base, cfg, data)
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    target, _ = finetuned(base, "target", data.train + rehearsal, cfg, cache_dir, quiet)
    oracle, _ = finetuned(base, "oracle", data.retain + rehearsal, cfg, cache_dir, quiet)
    splits = {"forget": data.forget, "retain": retain_eval_items(data, cfg.retain_eval_size), "world": data.world}
    oracle_eval = evaluate(oracle, base.codec, splits, cfg)
    ratios = tofu.split_metrics(oracle_eval.scores["forget"], "forget").truth_ratios
    return Prepared(cfg=cfg, data=data, codec=base.codec, target=target, splits=splits, oracle_ratios=ratios,
                    target_metrics=model_entry(evaluate(target, base.codec, splits, cfg), ratios)["metrics"],
                    oracle_metrics=model_entry(oracle_eval, ratios)["metrics"])


def run_point(prep: Prepared, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Unlearn a copy of the target with ``method`` and ``options``; its metrics and trace."""
    import copy

    model = copy.deepcopy(prep.target)
    cfg = dataclasses.replace(prep.cfg.unlearn, per_method={}, **options)
    trace = run_method(method, model, prep.codec, prep.data.forget, prep.data.retain, cfg)
    metrics = model_entry(evaluate(model, prep.codec, prep.splits, prep.cfg), prep.oracle_ratios)["metrics"]
    return {"forget_quality": metrics["forget_quality"], "model_utility": metrics["model_utility"],
            "forget_prob": metrics["forget"]["probability"], "trace": dataclasses.asdict(trace)}


def points(method: str, lrs: Sequence[float] = LRS) -> list[dict[str, Any]]:
    knobs = GRID[method]
    keys = sorted(knobs)
    return [{"lr": lr, **dict(zip(keys, values))}
            for lr in lrs for values in itertools.product(*(knobs[k] for k in keys))]


def select(rows: list[dict[str, Any]], target_utility: float, slack: float = UTILITY_SLACK) -> dict[str, Any]:
    """The rule of the module docstring over rows with mean ``forget_quality`` and ``model_utility``."""
    if not rows:
        raise ValueError("nothing to select from")
    feasible = [r for r in rows if r["model_utility"] >= target_utility - slack]
    if feasible:
        return max(feasible, key=lambda r: (round(r["forget_quality"], 6), r["model_utility"]))
    return max(rows, key=lambda r: r["model_utility"])


def choose_dual(result: dict[str, Any]) -> str | None:
    """The dual preset the name ``eupmu`` stands for: the one whose points hold the rule's choice
    over both presets' points together (None when the search ran neither preset)."""
    rows = [(preset, row) for preset in DUAL_PRESETS for row in result["points"].get(f"eupmu-{preset}", ())]
    if not rows:
        return None
    best = select([row for _, row in rows], result["target_utility"], result.get("slack", UTILITY_SLACK))
    return next(preset for preset, row in rows if row is best)


def search(methods: Sequence[str], seeds: Sequence[int], cache_dir: Path,
           progress: Callable[[str], None] = print) -> dict[str, Any]:
    prepared = []
    for seed in seeds:
        progress(f"validation seed {seed}: target and oracle")
        prepared.append(prepare(dataclasses.replace(tiny_config(seed), split="validation"), cache_dir))
    target_utility = sum(p.target_metrics["model_utility"] for p in prepared) / len(prepared)
    out: dict[str, Any] = {"seeds": list(seeds), "target_utility": target_utility, "slack": UTILITY_SLACK,
                           "target": [p.target_metrics["model_utility"] for p in prepared],
                           "points": {}, "per_method": {}}
    for method in methods:
        rows = []
        for options in points(method):
            start = time.perf_counter()
            runs = [run_point(p, method, options) for p in prepared]
            row = {"options": options, "runs": runs,
                   "forget_quality": sum(r["forget_quality"] for r in runs) / len(runs),
                   "model_utility": sum(r["model_utility"] for r in runs) / len(runs)}
            rows.append(row)
            progress(f"  {method} {options}: forget quality {row['forget_quality']:.3f}, "
                     f"utility {row['model_utility']:.3f} ({time.perf_counter() - start:.0f} s)")
        out["points"][method] = rows
        out["per_method"][method] = select(rows, target_utility)["options"]
    return out


def merge_into(path: Path, result: dict[str, Any]) -> None:
    """Keep the other methods of an earlier search on the same seeds (a search may cover a few methods)."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    if earlier.get("seeds") != result["seeds"]:
        return
    for key in ("points", "per_method"):
        result[key] = {**{k: v for k, v in earlier[key].items() if k not in result[key]}, **result[key]}


def main(argv: Sequence[str] | None = None) -> int:
    p = cli_args.Parser(prog="python -m eupmu_unlearn.llm.tuning", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for validation.json and llm_tiny_tuned.json")
    p.add_argument("--methods", type=cli_args.comma_list(cli_args.one_of(tuple(GRID), "method")),
                   default=tuple(GRID), help=f"comma-separated (default {','.join(GRID)})")
    p.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=VALIDATION_SEEDS,
                   help="validation seeds (default 100,101)")
    p.add_argument("--cache-dir", type=Path, default=None, help="fine-tuned model cache")
    p.add_argument("--threads", type=cli_args.integer(1), default=1)
    args = p.parse_args(argv)
    cli_args.check_output_dir(p, "--out", args.out)
    torch.set_num_threads(args.threads)
    from .model import default_cache_dir, force_offline

    force_offline()
    result = search(args.methods, args.seeds, args.cache_dir or default_cache_dir(),
                    progress=lambda m: print(m, flush=True))
    merge_into(args.out / "validation.json", result)
    cli_args.write_text_atomic(args.out / "validation.json", json.dumps(result, indent=2) + "\n")
    cli_args.write_text_atomic(args.out / "llm_tiny_tuned.json",
                               json.dumps({"split": "validation", "seeds": list(args.seeds),
                                           "rule": f"max mean forget quality s.t. mean utility >= target - "
                                                   f"{UTILITY_SLACK}", "eupmu_dual": choose_dual(result),
                                           "per_method": result["per_method"]},
                                          indent=2) + "\n")
    print(json.dumps(result["per_method"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
