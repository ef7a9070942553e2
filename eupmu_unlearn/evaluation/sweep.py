"""Hyperparameter selection on the validation split, stored for the benchmark to load.

Every method gets the same budget: the learning rates of ``LR_GRID`` times the three values of
its one knob (:data:`eupmu_kernels.evaluation.methods.METHODS`), each run on every sweep seed.
The criterion is the average gap to the retrained model (over UA, RA, TA, MIA) measured with
the *validation* split in place of the test split (TA on validation samples of the kept classes,
MIA with validation samples as non-members), averaged over the seeds. The test split is never
looked at. The winner per method is written into ``results/hparams.json`` under
``"<dataset>/<scenario>/<architecture>"``.

Run it as ``eupmu-unlearn sweep --dataset digits --scenario class`` or
``python -m eupmu_unlearn.evaluation.sweep ...``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import cli_args
from .data import DATASETS, SCENARIOS, forget_class_problem
from ..methods import LR_GRID, Hyper, Method, names, resolve
from .models import ARCHITECTURES, default_cache_dir
from .progress import progress_bar
from .runner import DEFAULT_METHODS, BenchmarkConfig, Progress, SeedContext, prepare_seed, run_method
from .selection import DEFAULT_SELECTION_PATH, selection_key, selection_problem, store_entry
from .threads import torch_threads
from .unlearning import SUPPORTED, Schedule

DESCRIPTION = ("Hyperparameters chosen per method on the validation split: every method gets the same budget, "
               "the learning-rate grid times the three values of its one knob, each run on every sweep seed; "
               "the winner has the smallest mean average gap to the retrained model with the validation split "
               "in place of the test split. The benchmark (eupmu-unlearn) loads this file by default.")
SWEEP_SEEDS = (100, 101, 102)  # disjoint from the reporting seeds 0, 1, 2
CRITERION = ("mean over seeds of the average |metric - retrained| over UA, RA, TA, MIA, "
             "with the validation split in place of the test split")


@dataclass(frozen=True)
class SweepConfig:
    dataset: str = "digits"
    scenario: str = "class"
    forget_class: int = 0
    seeds: tuple[int, ...] = SWEEP_SEEDS
    methods: tuple[str, ...] = DEFAULT_METHODS
    architecture: str | None = None
    train_epochs: int | None = None
    lr_grid: tuple[float, ...] = LR_GRID
    schedule: Schedule = field(default_factory=Schedule)
    cache_dir: Path | None = None
    device: str = "cpu"

    def benchmark(self) -> BenchmarkConfig:
        return BenchmarkConfig(dataset=self.dataset, scenario=self.scenario, forget_class=self.forget_class,
                               seeds=self.seeds, architecture=self.architecture,
                               train_epochs=self.train_epochs, schedule=self.schedule,
                               cache_dir=self.cache_dir, device=self.device, heldout="val",
                               measure_memory=False, trace_points=0, selection_path=None)


def sweep(cfg: SweepConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid for every method; returns the selection entry (not yet stored)."""
    bench = cfg.benchmark()
    contexts = [prepare_seed(bench, seed) for seed in cfg.seeds]
    chosen: dict[str, Any] = {}
    for name in cfg.methods:
        spec = resolve(name)
        grid = [_grid_point(spec, Hyper(lr, knob), contexts, bench, progress)
                for lr in cfg.lr_grid for knob in spec.knob_grid]
        best = min(grid, key=lambda point: point["val_gap"])  # ties: the earlier grid point
        chosen[spec.name] = {"lr": best["lr"], "knob_name": spec.knob, "knob": best["knob"],
                             "val_gap": best["val_gap"], "grid": grid}
    retrain = [ctx.retrain_metrics.to_dict() for ctx in contexts]
    return {"seeds": list(cfg.seeds), "forget_class": cfg.forget_class if cfg.scenario == "class" else None,
            "heldout": "val", "criterion": CRITERION, "lr_grid": list(cfg.lr_grid),
            "schedule": _schedule_dict(cfg.schedule),
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    method = cli_args.one_of(names(SUPPORTED), "method")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class")
    parser.add_argument("--forget-class", type=cli_args.integer(0), default=0)
    parser.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=",".join(map(str, SWEEP_SEEDS)),
                        help="comma-separated sweep seeds (default: %(default)s, disjoint from the reporting seeds)")
    parser.add_argument("--methods", type=cli_args.comma_list(method), default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None, help="default: mlp (digits), cnn (mnist1d)")
    parser.add_argument("--lrs", type=cli_args.comma_list(cli_args.positive),
                        default=",".join(f"{v:g}" for v in LR_GRID), help="learning-rate grid")
    parser.add_argument("--epochs", type=cli_args.integer(1), default=Schedule().epochs,
                        help="unlearning epochs of the methods whose knob is not the length")
    parser.add_argument("--train-epochs", type=cli_args.integer(1), default=None,
                        help="epochs of the original/retrained models (default: the recipe per dataset)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"model cache (default {default_cache_dir()})")
    parser.add_argument("--device", type=cli_args.device(), default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_SELECTION_PATH, help="selection file to update")
    parser.add_argument("--threads", type=cli_args.integer(0), default=1,
                        help="torch CPU threads (default 1: the models are tiny and more threads only add "
                             "overhead, a lot of it on a busy machine; 0 keeps torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything the sweep needs, before any work: the forget class exists, the selection file
    to update is one (or does not exist yet) and can be written."""
    problem = forget_class_problem(args.dataset, args.forget_class)
    if problem is not None:
        cli_args.fail(parser, "--forget-class", problem)
    methods = [resolve(m).name for m in args.methods]
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        cli_args.fail(parser, "--methods", f"names {', '.join(repeated)} twice (eupmu is an alias)")
    cli_args.check_directory_or_absent(parser, "--cache-dir", args.cache_dir)
    problem = selection_problem(args.out)
    if problem is not None:
        cli_args.fail(parser, "--out", problem)
    cli_args.check_output_file(parser, "--out", args.out)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        dataset=args.dataset, scenario=args.scenario, forget_class=args.forget_class,
        seeds=tuple(args.seeds), methods=tuple(resolve(m).name for m in args.methods),
        architecture=args.arch, train_epochs=args.train_epochs, lr_grid=tuple(args.lrs),
        schedule=Schedule(epochs=args.epochs),
        cache_dir=args.cache_dir if args.cache_dir is not None else default_cache_dir(), device=args.device,
    )


def main(argv: Sequence[str] | None = None, prog: str = "python -m eupmu_unlearn.evaluation.sweep") -> int:
    parser = cli_args.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    cfg = config_from_args(args)
    units = sum(len(cfg.lr_grid) * len(resolve(m).knob_grid) for m in cfg.methods)
    with torch_threads(args.threads), progress_bar(units, "sweep", enabled=not args.quiet) as progress:
        entry = sweep(cfg, progress)
    key = selection_key(cfg.dataset, cfg.scenario, cfg.benchmark().arch)
    command = " ".join(["eupmu-unlearn sweep", *argv])
    for choice in entry["methods"].values():
        choice["command"] = command
    store_entry(args.out, key, entry, {"description": DESCRIPTION})
    _print_choices(key, entry)
    print(f"selection stored under {key!r} in {args.out}")
    return 0


def _print_choices(key: str, entry: dict[str, Any]) -> None:
    print(f"{key}: selected on the validation split ({entry['criterion']})")
    for name, choice in entry["methods"].items():
        print(f"  {name:16s} lr={choice['lr']:<7g} {choice['knob_name']}={choice['knob']:<7g} "
              f"val gap {choice['val_gap']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
