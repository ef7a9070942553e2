"""``eupmu-unlearn``: the end-to-end unlearning benchmark on offline data.

    eupmu-unlearn [run] [options]      run methods, print the metrics table, write JSON and a PNG
    eupmu-unlearn sweep [options]      validation-split hyperparameter sweep into a selection file
    eupmu-unlearn table RESULT.json    print the markdown table of stored results
    eupmu-unlearn suite [options]      protocol v2: every class x 3 seeds, tuned on disjoint classes/seeds
    eupmu-unlearn update-space         gradient- vs update-space surgery per base rule (digits, class 7)

``run`` is the default. Its default is class-wise forgetting of digit 0 on scikit-learn's 8x8
digits with a small MLP, one seed, every method, the hyperparameters the package ships, output
under runs/eupmu-unlearn. Lists are comma-separated (--seeds 0,1,2, --methods eupmu,rl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from . import cli_args

PROG = "eupmu-unlearn"
COMMANDS = ("run", "sweep", "table", "suite", "update-space")
THREADS_HELP = ("torch CPU threads (default 1: the models are tiny and more threads only add overhead, a lot of it "
                "on a busy machine; 0 keeps torch's choice)")


# ---------------------------------------------------------------------------------- the parser


def methods_epilog() -> str:
    from .evaluation.unlearning import DEFAULT_FORGET_LOSS, SUPPORTED
    from .methods import IMAGE_EUPMU, describe

    return (f"methods ('eupmu' is {IMAGE_EUPMU}, the benchmark's default EUPMU configuration):\n"
            + describe(SUPPORTED, DEFAULT_FORGET_LOSS))


def build_parser() -> argparse.ArgumentParser:
    parser = cli_args.Parser(prog=PROG, description=__doc__, epilog=methods_epilog(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, add, handler, summary in (
            ("run", add_run_arguments, run, "run the benchmark (the default)"),
            ("sweep", add_sweep_arguments, sweep, "tune hyperparameters"),
            ("table", add_table_arguments, table, "print stored results"),
            ("suite", add_suite_arguments, suite, "protocol v2: tune on some classes and seeds, report on the others"),
            ("update-space", add_update_space_arguments, update_space,
             "count retain-loss increases of gradient- and update-space surgery per base rule")):
        sub = commands.add_parser(name, help=summary, description=summary, epilog=methods_epilog(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add(sub)
        sub.set_defaults(handler=handler, parser=sub)
    return parser


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """What both run and sweep unlearn from: data, scenario, the original and retrained models."""
    from .evaluation.data import DATASETS, SCENARIOS
    from .evaluation.models import ARCHITECTURES, default_cache_dir

    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class",
                        help="class: forget one class; random: forget a random 10%% of the training set")
    parser.add_argument("--forget-class", type=cli_args.integer(0), default=0)
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None, help="default: mlp (digits), cnn (mnist1d)")
    parser.add_argument("--train-epochs", type=cli_args.integer(1), default=None,
                        help="epochs of the original/retrained models (default: the recipe per dataset)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of the trained original and retrained models (default: %(default)s)")
    parser.add_argument("--device", type=cli_args.device(), default="cpu")
    parser.add_argument("--threads", type=cli_args.integer(0), default=1, help=THREADS_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_methods_argument(parser: argparse.ArgumentParser) -> None:
    from .evaluation.runner import DEFAULT_METHODS
    from .evaluation.unlearning import SUPPORTED
    from .methods import OLD_SPELLINGS, names

    method = cli_args.one_of(names(SUPPORTED), "method", aliases=OLD_SPELLINGS)
    parser.add_argument("--methods", type=cli_args.comma_list(method), default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods (default: %(default)s; all of them are listed below)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.unlearning import Schedule

    add_data_arguments(parser)
    add_methods_argument(parser)
    parser.add_argument("--seed", type=cli_args.seed, default=0)
    parser.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=None,
                        help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    parser.add_argument("--epochs", type=cli_args.integer(1), default=None,
                        help="unlearning epochs (passes over the retain set) for every method "
                             f"(default: tuned per method, else {Schedule().epochs})")
    parser.add_argument("--lr", type=cli_args.positive, default=None,
                        help="learning rate for every method (default: tuned)")
    parser.add_argument("--tolerance", type=cli_args.real(), default=None,
                        help="tolerance epsilon of eupmu-paper and ungrad (default: tuned, or 0 for eupmu-paper); "
                             "eupmu-reference gets err = -epsilon")
    parser.add_argument("--selection", type=Path, default=None,
                        help="a selection file written by eupmu-unlearn sweep, looked up before the "
                             "hyperparameters the package ships")
    parser.add_argument("--out", type=Path, default=Path("runs") / "eupmu-unlearn",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="train the models afresh and keep nothing")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the configuration and each method's hyperparameters (and where they come "
                             "from) as JSON, and stop: nothing is trained or written")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.selection import DEFAULT_SWEEP_PATH
    from .evaluation.sweep import SWEEP_SEEDS
    from .evaluation.unlearning import Schedule
    from .methods import LR_GRID

    add_data_arguments(parser)
    add_methods_argument(parser)
    parser.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=",".join(map(str, SWEEP_SEEDS)),
                        help="comma-separated sweep seeds (default: %(default)s, disjoint from the reporting seeds)")
    parser.add_argument("--lrs", type=cli_args.comma_list(cli_args.positive),
                        default=",".join(f"{v:g}" for v in LR_GRID), help="comma-separated learning-rate grid")
    parser.add_argument("--epochs", type=cli_args.integer(1), default=Schedule().epochs,
                        help="unlearning epochs of the methods whose knob is not the length")
    parser.add_argument("--out", type=Path, default=DEFAULT_SWEEP_PATH,
                        help="selection file to create or update (default: %(default)s)")


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULT.json")


MAX_DEFAULT_JOBS = 8  # each worker holds its own torch and models


def default_jobs() -> int:
    """The suite's default worker count: one per usable CPU core, capped."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_DEFAULT_JOBS))


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.data import DATASETS, SCENARIOS
    from .evaluation.models import default_cache_dir
    from .evaluation.suite import REPORTED_SEEDS, SUITE_METHODS, TUNING_SEEDS, TUNING_SUBSETS
    from .evaluation.unlearning import SUPPORTED, Schedule
    from .methods import LR_GRID, OLD_SPELLINGS, names

    seeds = cli_args.comma_list(cli_args.seed)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scenarios", type=cli_args.comma_list(cli_args.one_of(SCENARIOS, "scenario")), default=None,
                        help="comma-separated (default: class for digits, class,random for mnist1d)")
    parser.add_argument("--methods", type=cli_args.comma_list(cli_args.one_of(names(SUPPORTED), "method",
                                                                              aliases=OLD_SPELLINGS)),
                        default=",".join(SUITE_METHODS), help="comma-separated methods (default: %(default)s)")
    parser.add_argument("--reported-seeds", type=seeds, default=",".join(map(str, REPORTED_SEEDS)),
                        help="seeds of the reported runs (default: %(default)s)")
    parser.add_argument("--tuning-seeds", type=seeds, default=None,
                        help=f"seeds of the tuning runs, disjoint from the reported ones (default: "
                             f"{','.join(map(str, TUNING_SEEDS))} for digits, {TUNING_SEEDS[0]} for mnist1d)")
    parser.add_argument("--tuning-classes", type=cli_args.integer(1), default=None,
                        help="class-wise: tune each fold on this many of the other fold's classes (default: all "
                             "for digits, 1 for mnist1d)")
    parser.add_argument("--tuning-subsets", type=seeds, default=",".join(map(str, TUNING_SUBSETS)),
                        help="random: the forget subsets tuned on (default: %(default)s; reported: 0,1,2)")
    parser.add_argument("--lrs", type=cli_args.comma_list(cli_args.positive),
                        default=",".join(f"{v:g}" for v in LR_GRID), help="learning-rate grid (default: %(default)s)")
    parser.add_argument("--epochs", type=cli_args.integer(1), default=Schedule().epochs,
                        help="unlearning epochs of the methods whose knob is not the length (default: %(default)s)")
    parser.add_argument("--train-epochs", type=cli_args.integer(1), default=None,
                        help="epochs of the original/retrained models (default: the recipe per dataset)")
    parser.add_argument("--tiny", action="store_true",
                        help="a CI-sized run: one reported class per fold (subset, random) and seed 0, one tuning "
                             "class and seed 100, the first learning rate, 1 epoch, models trained 3 epochs")
    parser.add_argument("--out", type=Path, default=Path("runs") / "eupmu-unlearn" / "suite",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--selection-out", type=Path, default=None,
                        help="also store the pooled choices (all tuning contexts) in this selection file")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of the trained original and retrained models (default: %(default)s)")
    parser.add_argument("--device", type=cli_args.device(), default="cpu")
    parser.add_argument("--threads", type=cli_args.integer(0), default=1, help=THREADS_HELP)
    parser.add_argument("--jobs", type=cli_args.integer(1), default=default_jobs(),
                        help="worker processes (one thread each) for the tuning and reported runs (default: the "
                             f"usable CPU cores, at most {MAX_DEFAULT_JOBS}: %(default)s here)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the protocol (folds, contexts, grids, run counts) as JSON, and stop")


def add_update_space_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.models import default_cache_dir
    from .evaluation.update_space import STEPS

    parser.add_argument("--forget-class", type=cli_args.integer(0, 9), default=7)
    parser.add_argument("--seed", type=cli_args.seed, default=0)
    parser.add_argument("--steps", type=cli_args.integer(1), default=STEPS)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of the trained original model (default: %(default)s)")
    parser.add_argument("--threads", type=cli_args.integer(0), default=1, help=THREADS_HELP)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (.md) and JSON into this folder")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; ``run`` is inserted when no command is named."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------- checks


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .evaluation.data import forget_class_problem

    problem = forget_class_problem(args.dataset, args.forget_class)
    if problem is not None:
        cli_args.fail(parser, "--forget-class", problem)
    if not getattr(args, "no_cache", False):
        cli_args.check_directory_or_absent(parser, "--cache-dir", args.cache_dir)


def check_methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """No method twice (``eupmu`` and ``eupmu-reference`` are one); explicit surgery needs epsilon >= 0."""
    from .methods import resolve

    cli_args.check_distinct(parser, "--methods", args.methods, partial(resolve, image=True))
    tolerance = getattr(args, "tolerance", None)
    explicit = [name for name in args.methods if resolve(name, image=True).needs_non_negative_tolerance]
    if tolerance is not None and tolerance < 0 and explicit:
        cli_args.fail(parser, "--tolerance", f"must be >= 0 for {', '.join(explicit)} (explicit surgery), "
                                             f"got {tolerance:g}")


def check_selection(parser: argparse.ArgumentParser, path: Path | None) -> None:
    from .evaluation.selection import selection_problem

    if path is None:
        return
    problem = f"no such file: {path}" if not path.exists() else selection_problem(path)
    if problem is not None:
        cli_args.fail(parser, "--selection", problem)


def parse_run_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check every argument of a run; the output folder is created (and probed) last."""
    args = parse(["run", *argv])
    check_run_arguments(args.parser, args)
    return args


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_data_arguments(parser, args)
    check_methods(parser, args)
    check_selection(parser, args.selection)
    if not args.dry_run:
        cli_args.check_output_dir(parser, "--out", args.out)


def check_sweep_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything the sweep needs, before any work; the selection file to update must be one (or
    not exist yet) and be writable."""
    from .evaluation.selection import selection_problem

    check_data_arguments(parser, args)
    check_methods(parser, args)
    problem = selection_problem(args.out)
    if problem is not None:
        cli_args.fail(parser, "--out", problem)
    cli_args.check_output_file(parser, "--out", args.out)


# ---------------------------------------------------------------------------------- run


def benchmark_config(args: argparse.Namespace, **fields):
    """The configuration that run and sweep share, completed by ``fields``."""
    from .evaluation.runner import BenchmarkConfig

    return BenchmarkConfig(dataset=args.dataset, scenario=args.scenario, forget_class=args.forget_class,
                           architecture=args.arch, train_epochs=args.train_epochs, device=args.device, **fields)


def run_config(args: argparse.Namespace):
    from .evaluation.unlearning import Schedule

    return benchmark_config(args, methods=tuple(args.methods), seeds=tuple(args.seeds) if args.seeds else (args.seed,),
                            schedule=Schedule(epochs_override=args.epochs), lr=args.lr, tolerance=args.tolerance,
                            selection_path=args.selection, cache_dir=None if args.no_cache else args.cache_dir,
                            measure_memory=not args.no_memory)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation.progress import progress_bar
    from .evaluation.runner import choose_all, run_benchmark
    from .evaluation.threads import torch_threads
    from .methods import resolve

    check_run_arguments(args.parser, args)
    cfg = run_config(args)
    if args.dry_run:
        chosen = choose_all(cfg)
        methods = {name: {"label": resolve(name, image=True).label, "hyper": c.hyper.describe(resolve(name, image=True)),
                          "hyper_source": c.source} for name, c in chosen.items()}
        print(json.dumps({"config": cfg.to_dict(), "methods": methods}, indent=1))
        return 0
    units = len(cfg.seeds) * (1 + len(cfg.methods))
    with torch_threads(args.threads), progress_bar(units, PROG, enabled=not args.quiet) as progress:
        record = run_benchmark(cfg, progress)
    write_outputs(record, args.out, f"{cfg.dataset}_{cfg.scenario}", plot=not args.no_plot)
    return 0


def write_outputs(record: dict, out: Path, stem: str, plot: bool) -> None:
    """Write the JSON (and PNG), each atomically; print the metrics table and the target check."""
    from .evaluation.plots import plot_tradeoff
    from .evaluation.report import markdown_table, target_check
    from .methods import EUPMU_PRESETS

    out.mkdir(parents=True, exist_ok=True)
    json_path = cli_args.write_text_atomic(out / f"{stem}.json", json.dumps(record, indent=1) + "\n")
    cfg = record["config"]
    print(f"\n{cfg['dataset']} / {record['scenario']} / {cfg['architecture']}, seeds {list(cfg['seeds'])}\n")
    print(markdown_table(record))
    for name in ("eupmu", *EUPMU_PRESETS):
        lines = target_check(record, name)
        if lines:
            print(f"\ntarget check for {name}:\n  " + "\n  ".join(lines))
    print(f"\nJSON: {json_path}")
    if plot:
        png = out / f"{stem}_tradeoff.png"
        with cli_args.atomic_path(png) as tmp:
            plot_tradeoff(record, tmp)
        print(f"plot: {png}")


# ---------------------------------------------------------------------------------- sweep and table


def sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation import sweep as sweep_module
    from .evaluation.threads import torch_threads
    from .evaluation.unlearning import Schedule
    from .methods import resolve

    check_sweep_arguments(args.parser, args)
    cfg = benchmark_config(args, methods=tuple(resolve(m, image=True).name for m in args.methods), seeds=tuple(args.seeds),
                           schedule=Schedule(epochs=args.epochs), cache_dir=args.cache_dir)
    with torch_threads(args.threads):
        return sweep_module.run(cfg, args.lrs, args.out, " ".join([f"{PROG} sweep", *argv[1:]]), args.quiet)


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


def table(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation.report import markdown_table
    from .evaluation.suite import combined_table, is_suite_record, markdown_summary

    records = read_records(args.parser, args.results)
    for record in records:
        cfg = record["config"]
        print(f"**{cfg['dataset']}, {record['scenario']}, {cfg['architecture']}, seeds {list(cfg['seeds'])}**\n")
        print(markdown_table(record) + "\n")
        if is_suite_record(record):
            print(markdown_summary(record) + "\n")
    suites = [r for r in records if is_suite_record(r)]
    if len(suites) > 1:
        print("**protocol v2, every record side by side**\n")
        print(combined_table(suites) + "\n")
    return 0


# ---------------------------------------------------------------------------------- suite and update-space


def suite_protocols(args: argparse.Namespace) -> list:
    from .evaluation.suite import DEFAULT_SCENARIOS, DEFAULT_TUNING, make_protocol
    from .methods import resolve

    scenarios = args.scenarios or DEFAULT_SCENARIOS[args.dataset]
    methods = tuple(resolve(m, image=True).name for m in args.methods)
    defaults = DEFAULT_TUNING[args.dataset]
    if args.tuning_seeds is None:
        args.tuning_seeds = defaults["tuning_seeds"]
    if args.tuning_classes is None:
        args.tuning_classes = defaults["tuning_classes"]
    if args.tiny:
        return [make_protocol(args.dataset, scenario, methods=methods, reported_seeds=args.reported_seeds[:1],
                              tuning_seeds=args.tuning_seeds[:1], tuning_classes=1, reported_classes=1,
                              tuning_subsets=args.tuning_subsets[:1], lr_grid=args.lrs[:1], epochs=1,
                              train_epochs=3, note="tiny configuration (--tiny)") for scenario in scenarios]
    return [make_protocol(args.dataset, scenario, methods=methods, reported_seeds=args.reported_seeds,
                          tuning_seeds=args.tuning_seeds, tuning_classes=args.tuning_classes,
                          tuning_subsets=args.tuning_subsets, lr_grid=args.lrs, epochs=args.epochs,
                          train_epochs=args.train_epochs) for scenario in scenarios]


def suite(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation import suite as suite_module
    from .evaluation.progress import progress_bar
    from .evaluation.selection import selection_problem
    from .evaluation.threads import torch_threads
    from .methods import resolve

    parser = args.parser
    cli_args.check_distinct(parser, "--methods", args.methods, partial(resolve, image=True))
    cli_args.check_directory_or_absent(parser, "--cache-dir", args.cache_dir)
    try:
        protocols = suite_protocols(args)
    except ValueError as err:  # overlapping tuning and reported seeds or targets
        cli_args.fail(parser, "--tuning-seeds", str(err))
    if args.dry_run:
        print(json.dumps([p.to_dict() for p in protocols], indent=1))
        return 0
    cli_args.check_output_dir(parser, "--out", args.out)
    if args.selection_out is not None:
        problem = selection_problem(args.selection_out)
        if problem is not None:
            cli_args.fail(parser, "--selection-out", problem)
        cli_args.check_output_file(parser, "--selection-out", args.selection_out)
    command = " ".join([f"{PROG} suite", *argv[1:]])
    for protocol in protocols:
        with torch_threads(args.threads), progress_bar(protocol.work_units(), f"suite {protocol.scenario}",
                                                       enabled=not args.quiet) as progress:
            record = suite_module.run_suite(protocol, args.cache_dir, args.device, progress, args.jobs)
        record["command"] = command
        written = suite_module.write(record, args.out, plot=not args.no_plot)
        print(f"\n{protocol.dataset} / {record['scenario']} / {protocol.architecture}, protocol v2, "
              f"seeds {record['config']['seeds']} ({record['seconds']['total']:.0f} s)\n")
        print(suite_module.markdown_summary(record))
        print("\n" + "\n".join(f"wrote {display}" for display in map(str, written)))
        if args.selection_out is not None:
            key = suite_module.store_selection(args.selection_out, protocol, record, command)
            print(f"pooled choices stored under {key!r} in {args.selection_out}")
    return 0


def update_space(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation import update_space as module
    from .evaluation.threads import torch_threads

    cli_args.check_directory_or_absent(args.parser, "--cache-dir", args.cache_dir)
    if args.out is not None:
        cli_args.check_output_dir(args.parser, "--out", args.out)
    with torch_threads(args.threads):
        rows = module.run(args.forget_class, args.seed, args.steps, args.cache_dir)
    text = module.markdown(rows, args.forget_class, args.seed, args.steps)
    print(text)
    if args.out is not None:
        cli_args.write_text_atomic(args.out / "update_space.md", text + "\n")
        cli_args.write_text_atomic(args.out / "update_space.json", json.dumps(rows, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    handler: Callable[[argparse.Namespace, Sequence[str]], int] = args.handler
    return handler(args, argv if argv[:1] == [args.command] else [args.command, *argv])
