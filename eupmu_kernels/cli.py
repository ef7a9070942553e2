"""``eupmu-unlearn``: the end-to-end unlearning benchmark on offline data.

    eupmu-unlearn [options]            run methods, print the metrics table, write JSON and a PNG
    eupmu-unlearn sweep [options]      validation-split hyperparameter sweep (stored in results/)
    eupmu-unlearn table RESULT.json    print the markdown table of a stored result

The default run is class-wise forgetting of digit 0 on scikit-learn's 8x8 digits with a small MLP,
one seed, every method, hyperparameters from results/hparams.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

SUBCOMMANDS = ("sweep", "table")


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.data import DATASETS, SCENARIOS
    from .evaluation.methods import Schedule
    from .evaluation.models import ARCHITECTURES, default_cache_dir
    from .evaluation.runner import DEFAULT_METHODS
    from .evaluation.selection import DEFAULT_SELECTION_PATH

    parser = argparse.ArgumentParser(prog="eupmu-unlearn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class",
                        help="class: forget one class; random: forget a random 10%% of the training set")
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods; 'eupmu' is the default dual preset")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None, help="default: mlp (digits), cnn (mnist1d)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="unlearning epochs (passes over the retain set) for every method "
                             f"(default: tuned per method, else {Schedule().epochs})")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="epochs of the original/retrained models (default: the recipe per dataset)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: tuned)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="tolerance epsilon of eupmu-paper and ungrad (default: tuned, or 0 for eupmu-paper); "
                             "eupmu-reference gets err = -epsilon")
    parser.add_argument("--out", type=Path, default=Path("runs") / "eupmu-unlearn",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of the trained original and retrained models (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="train the models afresh and keep nothing")
    parser.add_argument("--selection", type=Path, default=DEFAULT_SELECTION_PATH,
                        help="stored hyperparameter selection (default: results/hparams.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny and more threads only add "
                             "overhead, a lot of it on a busy machine; 0 keeps torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace):
    from .evaluation.methods import Schedule, resolve
    from .evaluation.runner import BenchmarkConfig

    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else (args.seed,)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in methods:
        resolve(name)  # fail early on a typo
    return BenchmarkConfig(
        dataset=args.dataset, scenario=args.scenario, forget_class=args.forget_class, seeds=seeds,
        methods=methods, architecture=args.arch, train_epochs=args.train_epochs,
        schedule=Schedule(epochs_override=args.epochs),
        lr=args.lr, tolerance=args.tolerance, selection_path=args.selection,
        cache_dir=None if args.no_cache else args.cache_dir, device=args.device,
        measure_memory=not args.no_memory,
    )


def run(argv: Sequence[str]) -> int:
    from .evaluation.progress import progress_bar
    from .evaluation.runner import run_benchmark
    from .evaluation.threads import torch_threads

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    units = len(cfg.seeds) * (1 + len(cfg.methods))
    with torch_threads(args.threads), progress_bar(units, "eupmu-unlearn", enabled=not args.quiet) as progress:
        record = run_benchmark(cfg, progress)
    write_outputs(record, args.out, f"{cfg.dataset}_{cfg.scenario}", plot=not args.no_plot)
    return 0


def write_outputs(record: dict, out: Path, stem: str, plot: bool) -> None:
    """Write the JSON (and PNG), print the metrics table and the target check."""
    from .evaluation.plots import plot_tradeoff
    from .evaluation.tables import markdown_table, target_check

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    cfg = record["config"]
    print(f"\n{cfg['dataset']} / {record['scenario']} / {cfg['architecture']}, seeds {cfg['seeds']}\n")
    print(markdown_table(record))
    for name in ("eupmu", "eupmu-paper", "eupmu-reference"):
        lines = target_check(record, name)
        if lines:
            print(f"\ntarget check for {name}:\n  " + "\n  ".join(lines))
    print(f"\nJSON: {json_path}")
    if plot:
        print(f"plot: {plot_tradeoff(record, out / f'{stem}_tradeoff.png')}")


def table(argv: Sequence[str]) -> int:
    from .evaluation.tables import markdown_table

    parser = argparse.ArgumentParser(prog="eupmu-unlearn table", description="print a result's markdown table")
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.results:
        record = json.loads(path.read_text())
        seeds = record["config"]["seeds"]
        print(f"**{record['config']['dataset']}, {record['scenario']}, {record['config']['architecture']}, "
              f"seeds {seeds}**\n")
        print(markdown_table(record) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        from .evaluation.sweep import main as sweep_main

        return sweep_main(argv[1:], prog="eupmu-unlearn sweep")
    if argv and argv[0] == "table":
        return table(argv[1:])
    return run(argv)
