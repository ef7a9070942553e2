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

from . import cli_args

SUBCOMMANDS = ("sweep", "table")
PROG = "eupmu-unlearn"


def method_names() -> tuple[str, ...]:
    from .evaluation.unlearning import SUPPORTED
    from .methods import names

    return names(SUPPORTED)


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.data import DATASETS, SCENARIOS
    from .evaluation.unlearning import Schedule
    from .evaluation.models import ARCHITECTURES, default_cache_dir
    from .evaluation.runner import DEFAULT_METHODS

    parser = cli_args.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class",
                        help="class: forget one class; random: forget a random 10%% of the training set")
    parser.add_argument("--forget-class", type=cli_args.integer(0), default=0)
    parser.add_argument("--seed", type=cli_args.seed, default=0)
    parser.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=None,
                        help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    parser.add_argument("--methods", type=cli_args.comma_list(cli_args.one_of(method_names(), "method")),
                        default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods; 'eupmu' is the default dual preset")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None, help="default: mlp (digits), cnn (mnist1d)")
    parser.add_argument("--epochs", type=cli_args.integer(1), default=None,
                        help="unlearning epochs (passes over the retain set) for every method "
                             f"(default: tuned per method, else {Schedule().epochs})")
    parser.add_argument("--train-epochs", type=cli_args.integer(1), default=None,
                        help="epochs of the original/retrained models (default: the recipe per dataset)")
    parser.add_argument("--lr", type=cli_args.positive, default=None,
                        help="learning rate for every method (default: tuned)")
    parser.add_argument("--tolerance", type=cli_args.real(), default=None,
                        help="tolerance epsilon of eupmu-paper and ungrad (default: tuned, or 0 for eupmu-paper); "
                             "eupmu-reference gets err = -epsilon")
    parser.add_argument("--out", type=Path, default=Path("runs") / "eupmu-unlearn",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of the trained original and retrained models (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="train the models afresh and keep nothing")
    parser.add_argument("--selection", type=Path, default=None,
                        help="stored hyperparameter selection (default: results/hparams.json)")
    parser.add_argument("--device", type=cli_args.device(), default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=cli_args.integer(0), default=1,
                        help="torch CPU threads (default 1: the models are tiny and more threads only add "
                             "overhead, a lot of it on a busy machine; 0 keeps torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_forget_class(parser: argparse.ArgumentParser, dataset: str, forget_class: int) -> None:
    from .evaluation.data import forget_class_problem

    problem = forget_class_problem(dataset, forget_class)
    if problem is not None:
        cli_args.fail(parser, "--forget-class", problem)


def check_tolerance(parser: argparse.ArgumentParser, tolerance: float | None, methods: Sequence[str]) -> None:
    """Explicit surgery needs epsilon >= 0 (an implicit method's epsilon may be negative)."""
    from .methods import resolve

    if tolerance is None or tolerance >= 0:
        return
    explicit = [name for name in methods if resolve(name).needs_non_negative_tolerance]
    if explicit:
        cli_args.fail(parser, "--tolerance", f"must be >= 0 for {', '.join(explicit)} (explicit surgery), "
                                             f"got {tolerance:g}")


def check_selection(parser: argparse.ArgumentParser, option: str, given: Path | None) -> Path:
    """The selection file to read: the one given (which must exist) or the stored default."""
    from .evaluation.selection import DEFAULT_SELECTION_PATH, selection_problem

    path = DEFAULT_SELECTION_PATH if given is None else given
    if given is not None and not given.exists():
        cli_args.fail(parser, option, f"no such file: {given}")
    problem = selection_problem(path)
    if problem is not None:
        cli_args.fail(parser, option, problem)
    return path


def parse_run_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check every argument of a run; the output folder is created (and probed) last."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_forget_class(parser, args.dataset, args.forget_class)
    check_tolerance(parser, args.tolerance, args.methods)
    args.selection = check_selection(parser, "--selection", args.selection)
    if not args.no_cache:
        cli_args.check_directory_or_absent(parser, "--cache-dir", args.cache_dir)
    cli_args.check_output_dir(parser, "--out", args.out)
    return args


def config_from_args(args: argparse.Namespace):
    from .evaluation.unlearning import Schedule
    from .evaluation.runner import BenchmarkConfig
    from .evaluation.selection import DEFAULT_SELECTION_PATH

    return BenchmarkConfig(
        dataset=args.dataset, scenario=args.scenario, forget_class=args.forget_class,
        seeds=tuple(args.seeds) if args.seeds else (args.seed,), methods=tuple(args.methods),
        architecture=args.arch, train_epochs=args.train_epochs,
        schedule=Schedule(epochs_override=args.epochs),
        lr=args.lr, tolerance=args.tolerance,
        selection_path=DEFAULT_SELECTION_PATH if args.selection is None else args.selection,
        cache_dir=None if args.no_cache else args.cache_dir, device=args.device,
        measure_memory=not args.no_memory,
    )


def run(argv: Sequence[str]) -> int:
    from .evaluation.progress import progress_bar
    from .evaluation.runner import run_benchmark
    from .evaluation.threads import torch_threads

    args = parse_run_arguments(argv)
    cfg = config_from_args(args)
    units = len(cfg.seeds) * (1 + len(cfg.methods))
    with torch_threads(args.threads), progress_bar(units, PROG, enabled=not args.quiet) as progress:
        record = run_benchmark(cfg, progress)
    write_outputs(record, args.out, f"{cfg.dataset}_{cfg.scenario}", plot=not args.no_plot)
    return 0


def write_outputs(record: dict, out: Path, stem: str, plot: bool) -> None:
    """Write the JSON (and PNG), each atomically; print the metrics table and the target check."""
    from .evaluation.plots import plot_tradeoff
    from .evaluation.report import markdown_table, target_check

    out.mkdir(parents=True, exist_ok=True)
    json_path = cli_args.write_text_atomic(out / f"{stem}.json", json.dumps(record, indent=1) + "\n")
    cfg = record["config"]
    print(f"\n{cfg['dataset']} / {record['scenario']} / {cfg['architecture']}, seeds {cfg['seeds']}\n")
    print(markdown_table(record))
    for name in ("eupmu", "eupmu-paper", "eupmu-reference"):
        lines = target_check(record, name)
        if lines:
            print(f"\ntarget check for {name}:\n  " + "\n  ".join(lines))
    print(f"\nJSON: {json_path}")
    if plot:
        png = out / f"{stem}_tradeoff.png"
        with cli_args.atomic_path(png) as tmp:
            plot_tradeoff(record, tmp)
        print(f"plot: {png}")


def read_records(parser: argparse.ArgumentParser, paths: Sequence[Path]) -> list[dict]:
    """Every file parsed and recognised as an eupmu-unlearn result, or one line naming the first that is not."""
    from .evaluation.report import record_problem

    records = []
    for path in paths:
        if not path.is_file():
            parser.error(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            parser.error(f"{path}: not a JSON file (expected a result JSON written by {PROG})")
        except OSError as err:
            parser.error(f"{path}: cannot read it: {err.strerror or err}")
        problem = record_problem(data)
        if problem is not None:
            parser.error(f"{path}: {problem}")
        records.append(data)
    return records


def table(argv: Sequence[str]) -> int:
    from .evaluation.report import markdown_table

    parser = cli_args.Parser(prog=f"{PROG} table", description="print a result's markdown table")
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULT.json")
    args = parser.parse_args(argv)
    for record in read_records(parser, args.results):
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
