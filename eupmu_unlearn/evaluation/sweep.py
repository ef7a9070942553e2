"""Hyperparameter selection on the validation split: ``eupmu-unlearn sweep``.

Every method gets the same budget: the learning rates of ``LR_GRID`` times the three values of
its one knob (:data:`eupmu_unlearn.methods.METHODS`), each run on every sweep seed. The criterion
is the average gap to the retrained model (over UA, RA, TA, MIA) measured with the *validation*
split in place of the test split (TA on validation samples of the kept classes, MIA with
validation samples as non-members), averaged over the seeds. The test split is never looked at.
The winner per method is written under ``"<dataset>/<scenario>/<architecture>"`` into a user's
selection file (default ``runs/eupmu-unlearn/hparams.json``), which
``eupmu-unlearn run --selection FILE`` reads in front of the selection the package ships.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..methods import LR_GRID, Hyper, Method, resolve
from .progress import progress_bar
from .runner import BenchmarkConfig, Progress, SeedContext, prepare_seed, run_method
from .selection import selection_key, store_entry
from .unlearning import Schedule

DESCRIPTION = ("Hyperparameters chosen per method on the validation split: every method gets the same budget, "
               "the learning-rate grid times the three values of its one knob, each run on every sweep seed; "
               "the winner has the smallest mean average gap to the retrained model with the validation split "
               "in place of the test split. eupmu-unlearn run --selection FILE reads this file.")
SWEEP_SEEDS = (100, 101, 102)  # disjoint from the reporting seeds 0, 1, 2
CRITERION = ("mean over seeds of the average |metric - retrained| over UA, RA, TA, MIA, "
             "with the validation split in place of the test split")


def on_validation(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """``cfg`` as a sweep runs it: the validation split held out, no memory probe, no trajectories."""
    return replace(cfg, heldout="val", measure_memory=False, trace_points=0, selection_path=None)


def sweep(cfg: BenchmarkConfig, lr_grid: Sequence[float] = LR_GRID,
          progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid for every method of ``cfg``; returns the selection entry (not yet stored)."""
    bench = on_validation(cfg)
    contexts = [prepare_seed(bench, seed) for seed in bench.seeds]
    chosen: dict[str, Any] = {}
    for name in bench.methods:
        spec = resolve(name, image=True)
        grid = [_grid_point(spec, Hyper(lr, knob), contexts, bench, progress)
                for lr in lr_grid for knob in spec.knob_grid]
        best = min(grid, key=lambda point: point["val_gap"])  # ties: the earlier grid point
        chosen[spec.name] = {"lr": best["lr"], "knob_name": spec.knob, "knob": best["knob"],
                             "val_gap": best["val_gap"], "grid": grid}
    retrain = [ctx.retrain_metrics.to_dict() for ctx in contexts]
    return {"seeds": list(bench.seeds), "forget_class": bench.forget_class if bench.scenario == "class" else None,
            "heldout": "val", "criterion": CRITERION, "lr_grid": list(lr_grid),
            "schedule": _schedule_dict(bench.schedule),
            "retrain_val": {k: float(np.mean([r[k] for r in retrain])) for k in ("UA", "RA", "TA", "MIA")},
            "methods": chosen}


def _grid_point(spec: Method, hyper: Hyper, contexts: Sequence[SeedContext], bench: BenchmarkConfig,
                progress: Progress | None) -> dict[str, Any]:
    if progress is not None:
        progress(f"{spec.name} lr={hyper.lr:g} {spec.knob}={hyper.knob:g}")
    runs = [run_method(ctx, spec, hyper, bench).metrics for ctx in contexts]
    point: dict[str, Any] = {"lr": hyper.lr, "knob": hyper.knob}
    for key in ("UA", "RA", "TA", "MIA"):
        point[key] = round(float(np.mean([getattr(m, key) for m in runs])), 3)
    point["val_gap"] = round(float(np.mean([m.gap for m in runs])), 4)
    return point


def _schedule_dict(schedule: Schedule) -> dict[str, Any]:
    return {k: getattr(schedule, k) for k in ("epochs", "forget_batch", "retain_batch", "momentum",
                                              "weight_decay", "exact_dual")}


def run(cfg: BenchmarkConfig, lr_grid: Sequence[float], out: Path, command: str, quiet: bool = False) -> int:
    """Sweep, store the winners under the run's key in ``out`` and print them."""
    units = sum(len(lr_grid) * len(resolve(m, image=True).knob_grid) for m in cfg.methods)
    with progress_bar(units, "sweep", enabled=not quiet) as progress:
        entry = sweep(cfg, lr_grid, progress)
    key = selection_key(cfg.dataset, cfg.scenario, cfg.arch)
    for choice in entry["methods"].values():
        choice["command"] = command
    store_entry(out, key, entry, {"description": DESCRIPTION})
    _print_choices(key, entry)
    print(f"selection stored under {key!r} in {out}; use it with eupmu-unlearn run --selection {out}")
    return 0


def _print_choices(key: str, entry: dict[str, Any]) -> None:
    print(f"{key}: selected on the validation split ({entry['criterion']})")
    for name, choice in entry["methods"].items():
        print(f"  {name:16s} lr={choice['lr']:<7g} {choice['knob_name']}={choice['knob']:<7g} "
              f"val gap {choice['val_gap']:.3f}")

