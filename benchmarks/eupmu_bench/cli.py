"""``eupmu-bench``: what EUPMU costs against naive surgery, composed torch and fused AdamW.

    eupmu-bench [step] [options]       the optimizer step alone, on model-shaped tensors (default)
    eupmu-bench iteration [options]    whole iterations with real autograd on a causal LM
    eupmu-bench scale [options]        a ~1e9-parameter Llama: time, peak memory, largest model that fits, FSDP2
    eupmu-bench violations [options]   steps whose first-order retain change exceeds the budget, per surgery space

``step`` prints a table and writes ``results.json``, ``results.md`` and ``step_time.png`` into
``--out``; ``iteration`` writes ``iteration.json`` and ``iteration.md``; ``scale`` writes
``scale.json``, ``scale.md`` and ``scale_memory.png`` (and ``fsdp/fsdp.json``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eupmu_unlearn import cli_args

from .baselines import Settings
from .machine import load_average
from .methods import METHODS, resolve_methods
from .plot import plot_step_times
from .report import (format_skipped, format_targets, largest_size_only, markdown_report, markdown_table, targets,
                     write_json)
from .runner import BACKEND_NAMES, RunConfig, run
from .workloads import FAMILIES

PROG = "eupmu-bench"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Defaults:
    sizes: tuple[float, ...]
    repeats: int
    warmup: int
    bandwidth_numel: float


# Full runs go to the largest size that fits comfortably: ~5e7 on a CPU, ~1e9 fp32 on an 80 GB GPU.
DEFAULTS = {
    ("cpu", False): Defaults((1e6, 3e6, 1e7, 2e7, 5e7), 10, 2, 1e8),
    ("cpu", True): Defaults((1e6, 3e6), 3, 1, 2e7),
    ("cuda", False): Defaults((1e6, 1e7, 1e8, 1e9), 20, 3, 2.5e8),
    ("cuda", True): Defaults((1e7, 1e8), 10, 3, 1e8),
}


def build_parser() -> argparse.ArgumentParser:
    p = cli_args.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (under a minute on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for results.json/.md and the PNG")
    p.add_argument("--device", type=cli_args.device(allow_auto=True), default="auto",
                   help="auto (cuda when available), cpu, cuda or cuda:N")
    cli_args.add_list_option(p, "--models", cli_args.one_of(sorted(FAMILIES), "model"), ("gpt2",),
                             "comma-separated tensor layouts to scale (default gpt2)")
    cli_args.add_list_option(p, "--sizes", cli_args.count, None,
                             "comma-separated total parameter counts, e.g. 1e6,2e7")
    cli_args.add_list_option(p, "--dtypes", cli_args.one_of(sorted(DTYPES), "dtype"), ("float32", "bfloat16"),
                             "comma-separated parameter dtypes (default float32,bfloat16)")
    cli_args.add_list_option(p, "--methods", cli_args.one_of(("all", *METHODS), "method"), ("all",),
                             f"'all' or some of: {', '.join(METHODS)}")
    cli_args.add_list_option(p, "--backends", cli_args.one_of(BACKEND_NAMES, "backend"), BACKEND_NAMES,
                             "comma-separated kernel backends for our optimizer (those that cannot run are skipped "
                             "and listed)")
    p.add_argument("--repeats", type=cli_args.integer(1), help="timed steps per case (median reported)")
    p.add_argument("--rounds", type=cli_args.integer(1), default=1,
                   help="passes over all cases, each starting one case later; the median is taken over the "
                        "timed steps of every pass (interleaves the methods against a drifting machine)")
    p.add_argument("--warmup", type=cli_args.integer(0),
                   help="untimed steps per case before timing (at least 1 is run)")
    p.add_argument("--state-dtype", choices=("param", "float32"), default="param",
                   help="our optimizer's moment dtype (torch.optim always uses the parameter dtype)")
    p.add_argument("--bandwidth-numel", type=cli_args.count, help="elements of the copy-bandwidth measurement")
    p.add_argument("--allow-interpreter", action="store_true", help="time Triton on CPU (interpreter) too")
    p.add_argument("--threads", type=cli_args.integer(1),
                   help="torch CPU threads (default: torch's choice, recorded in the results)")
    p.add_argument("--seed", type=cli_args.seed, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-methods", action="store_true", help="describe the methods and exit")
    return p


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the parser alone cannot check; the output folder is created (and probed) last."""
    if "all" in args.methods and len(args.methods) > 1:
        cli_args.fail(parser, "--methods", "'all' cannot be combined with other methods")
    cli_args.check_output_dir(parser, "--out", args.out)


def resolve_device(name: str) -> torch.device:
    """The device of a checked ``--device`` value (``auto``: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_config(args: argparse.Namespace) -> RunConfig:
    device = resolve_device(args.device)
    defaults = DEFAULTS[(device.type if device.type == "cuda" else "cpu", args.quick)]
    settings = Settings(state_dtype=torch.float32 if args.state_dtype == "float32" else None)
    return RunConfig(
        device=device,
        models=list(dict.fromkeys(args.models)),
        sizes=sorted(set(args.sizes or [int(s) for s in defaults.sizes])),
        dtypes=list(dict.fromkeys(DTYPES[d] for d in args.dtypes)),
        methods=resolve_methods(list(dict.fromkeys(args.methods))),
        backends=list(dict.fromkeys(args.backends)),
        repeats=defaults.repeats if args.repeats is None else args.repeats, rounds=args.rounds,
        warmup=defaults.warmup if args.warmup is None else args.warmup,
        settings=settings,
        bandwidth_numel=args.bandwidth_numel or int(defaults.bandwidth_numel),
        allow_interpreter=args.allow_interpreter,
        seed=args.seed,
    )


def warn_if_busy(config: RunConfig) -> None:
    """Other work on the CPUs disturbs the timings, and intra-op threads then wait on each other."""
    load, cpus = load_average(), os.cpu_count() or 1
    if config.device.type == "cpu" and load is not None and load > cpus:
        print(f"eupmu-bench: the 1-minute load average is {load:.1f} on {cpus} CPUs, so other work will disturb "
              "the timings; on a busy machine --threads 1 runs far faster and steadier", file=sys.stderr)


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda total: tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)


def write_outputs(results: dict[str, Any], out: Path, plot: bool) -> list[Path]:
    """results.json, results.md and (when asked and there is something to plot) the PNG, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    with cli_args.atomic_path(written[0]) as tmp:
        write_json(results, tmp)
    cli_args.write_text_atomic(written[1], markdown_report(results))
    png = out / "step_time.png"
    title = f"{results['machine'].get('gpu') or results['machine']['cpu_model']}: {results['command']}"
    if plot:
        with cli_args.atomic_path(png) as tmp:
            if plot_step_times(results["records"], tmp, title):
                written.append(png)
    return written


def print_summary(results: dict[str, Any]) -> None:
    m, bw = results["machine"], results["bandwidth"]
    print(f"{m['date']}  {m.get('gpu') or m['cpu_model']}  torch {m['torch']}  triton {m['triton']}")
    print(f"copy bandwidth ceiling {bw['ceiling_gbps']:.1f} GB/s ({bw['start']['kernel']}, "
          f"{bw['start']['bytes_per_element']} B/elem); memory: {results['memory_source']}")
    load = results["load_average"]
    if load["start"] is not None:
        print(f"1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end "
              f"({m['cpu_count']} CPUs): a load above the CPU count means other work disturbed the timings")
    print()
    print(markdown_table(results["records"]))
    checks = [c for c in largest_size_only(results["targets"]) if c["value"] is not None]
    if checks:
        print("\nspeed targets at the largest size (measured, informative):")
        print(format_targets(checks))
    if results["skipped"]:
        print()
        print(format_skipped(results["skipped"]))


def build_iteration_parser() -> argparse.ArgumentParser:
    from .iteration import METHODS as ITERATION_METHODS

    p = cli_args.Parser(prog=f"{PROG} iteration", description="Whole unlearning iterations with real autograd: "
                        "seconds per iteration, the step's share, the price over GradDiff, page faults, peak memory.")
    p.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic",
                   help="synthetic: a Llama-shaped decoder of --size parameters; smollm2: SmolLM2-135M (llm extra)")
    p.add_argument("--size", type=cli_args.count, default=int(2e7), help="parameters of the synthetic model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch", type=cli_args.integer(1), default=1)
    p.add_argument("--seq", type=cli_args.integer(2), default=32)
    p.add_argument("--rounds", type=cli_args.integer(1), default=3)
    p.add_argument("--iterations", type=cli_args.integer(1), default=5, help="timed iterations per method and round")
    p.add_argument("--warmup", type=cli_args.integer(0), default=2)
    cli_args.add_list_option(p, "--methods", cli_args.one_of(tuple(ITERATION_METHODS), "method"),
                             tuple(ITERATION_METHODS), f"comma-separated, of: {', '.join(ITERATION_METHODS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--threads", type=cli_args.integer(1))
    p.add_argument("--device", type=cli_args.device(allow_auto=True), default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/bench-iteration"))
    return p


def iteration_main(argv: list[str]) -> int:
    from .iteration import IterationConfig, format_table, run_iterations, smollm2

    parser = build_iteration_parser()
    args = parser.parse_args(argv)
    cli_args.check_output_dir(parser, "--out", args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    config = IterationConfig(numel=args.size, dtype=dtype, device=device, batch=args.batch, seq=args.seq,
                             rounds=args.rounds, iterations=args.iterations, warmup=args.warmup,
                             methods=tuple(dict.fromkeys(args.methods)), memory=not args.no_memory)
    model, vocab = smollm2(dtype, device) if args.model == "smollm2" else (None, None)
    progress = None if not sys.stderr.isatty() else (lambda text: print(text, file=sys.stderr))
    load_start = load_average()
    result = run_iterations(config, model, vocab, progress)
    from .machine import machine_info

    result.update({"command": "eupmu-bench iteration " + shlex.join(argv), "model": args.model,
                   "machine": machine_info(device), "threads": torch.get_num_threads(), "batch": args.batch,
                   "seq": args.seq, "dtype": args.dtype,
                   "load_average": {"start": load_start, "end": load_average()}})
    table = format_table(result)
    print(f"{result['command']}\n{result['numel']:,} parameters, {args.batch} x {args.seq} tokens per side, "
          f"{result['threads']} threads, load {load_start} -> {result['load_average']['end']}\n")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with cli_args.atomic_path(args.out / "iteration.json") as tmp:
        write_json(result, tmp)
    cli_args.write_text_atomic(args.out / "iteration.md", f"`{result['command']}`\n\n{table}\n")
    return 0


# Full run: the fit through 1e8 and 3e8, checked at 1.1e9 (FSDP2 there too); quick: ~1e8.
SCALE_SIZES = {False: (1e8, 3e8, 1.1e9), True: (5e7, 1e8)}


def build_scale_parser() -> argparse.ArgumentParser:
    from .scale import LR, METHODS as SCALE_METHODS, VOCAB
    from .scale_fsdp import LAYOUTS

    p = cli_args.Parser(prog=f"{PROG} scale", description="Unlearning a Llama-shaped model of ~1e9 parameters "
                        "(bf16 weights, fp32 moments) on this machine: seconds per iteration, the step's share, peak "
                        "process memory and the bytes model per method, each in its own process; the largest model "
                        "that fits a given memory; and the same model sharded with FSDP2 over gloo ranks, compared "
                        "with the single-process step.")
    p.add_argument("--quick", action="store_true",
                   help="sizes 5e7,1e8, one timed iteration, FSDP2 at 1e8 (a few minutes on 2 cores)")
    cli_args.add_list_option(p, "--sizes", cli_args.count, None, "comma-separated parameter counts; the fit uses "
                             "the two smallest, the largest checks it (default 1e8,3e8,1.1e9; --quick 5e7,1e8)")
    cli_args.add_list_option(p, "--methods", cli_args.one_of(tuple(SCALE_METHODS), "method"), tuple(SCALE_METHODS),
                             f"comma-separated, of: {', '.join(SCALE_METHODS)}")
    p.add_argument("--iterations", type=cli_args.integer(1), help="timed iterations per method (default 3; --quick 1)")
    p.add_argument("--warmup", type=cli_args.integer(0), default=1, help="untimed iterations before timing")
    p.add_argument("--batch", type=cli_args.integer(1), default=2, help="sequences per side (forget, retain)")
    p.add_argument("--seq", type=cli_args.integer(2), default=64, help="tokens per sequence")
    p.add_argument("--vocab", type=cli_args.integer(16), default=VOCAB,
                   help=f"vocabulary size of the model (default {VOCAB}, Llama 2's)")
    p.add_argument("--lr", type=cli_args.positive, default=LR,
                   help=f"learning rate of every method (default {LR:g}: large enough to move bf16 weights)")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="seed of the weights and the token batches")
    p.add_argument("--threads", type=cli_args.integer(1), help="torch threads per method (default: torch's choice)")
    p.add_argument("--memory-budget", type=cli_args.positive, metavar="GIB",
                   help="memory a method may use (default: what the system reports available at the start); a "
                        "method predicted to need more is not started")
    cli_args.add_list_option(p, "--fit-memory", cli_args.positive, (24.0, 80.0),
                             "memory sizes in GiB to read the largest model that fits at (default 24,80)")
    p.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 part")
    p.add_argument("--fsdp-size", type=cli_args.count, help="parameters of the FSDP2 model (default: the largest size)")
    p.add_argument("--fsdp-ranks", type=cli_args.integer(2), default=2)
    cli_args.add_list_option(p, "--fsdp-layouts", cli_args.one_of(LAYOUTS, "layout"), LAYOUTS,
                             "replicated (every rank the whole batch), split (rows per rank)")
    p.add_argument("--no-tensor-memory", action="store_true", help="skip the peak-tensor-memory iteration")
    p.add_argument("--no-check", action="store_true", help="skip the float64 check of the update")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    return p


def scale_main(argv: list[str]) -> int:
    import time

    import transformers

    from . import scale, scale_fsdp
    from .machine import machine_info
    from .scale_report import markdown, plot_memory

    parser = build_scale_parser()
    args = parser.parse_args(argv)
    cli_args.check_output_dir(parser, "--out", args.out)
    if "split" in args.fsdp_layouts and args.batch % args.fsdp_ranks:
        cli_args.fail(parser, "--batch", f"{args.batch} rows do not split evenly over {args.fsdp_ranks} ranks")
    sizes = tuple(sorted(set(args.sizes or (int(n) for n in SCALE_SIZES[args.quick]))))
    checked = [("--sizes", n) for n in sizes] + ([("--fsdp-size", args.fsdp_size)] if args.fsdp_size else [])
    for option, numel in checked:
        try:
            scale.llama_shape(numel, args.vocab)
        except ValueError as err:
            cli_args.fail(parser, option, str(err))
    config = scale.ScaleConfig(
        sizes=sizes, methods=tuple(dict.fromkeys(args.methods)), vocab=args.vocab, batch=args.batch, seq=args.seq,
        warmup=args.warmup, iterations=args.iterations or (1 if args.quick else 3), lr=args.lr, seed=args.seed,
        threads=args.threads, memory_budget=None if args.memory_budget is None else int(args.memory_budget * scale.GIB),
        fit_memory_gib=tuple(args.fit_memory), tensor_memory=not args.no_tensor_memory, check=not args.no_check)
    command = "eupmu-bench scale " + shlex.join(argv)

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    progress(command)
    started, load_start = time.perf_counter(), load_average()
    result = scale.run_scale(config, progress)
    if not args.no_fsdp:
        result["fsdp"] = _scale_fsdp(args, config, result, progress)
    result.update({"command": command, "machine": machine_info(torch.device("cpu")),
                   "transformers": transformers.__version__,
                   "threads": next((r["threads"] for r in result["records"] if "threads" in r), None),
                   "load_average": {"start": load_start, "end": load_average()},
                   "wall_s": time.perf_counter() - started})
    with cli_args.atomic_path(args.out / "scale.json") as tmp:
        write_json(result, tmp)
    text = markdown(result)
    cli_args.write_text_atomic(args.out / "scale.md", text)
    written = [args.out / "scale.json", args.out / "scale.md"]
    if not args.no_plot:
        with cli_args.atomic_path(args.out / "scale_memory.png") as tmp:
            if plot_memory(result, tmp):
                written.append(args.out / "scale_memory.png")
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    problems = scale.failures(result)
    fsdp = result.get("fsdp")
    if fsdp is not None and "failed" in fsdp:
        problems.append(f"FSDP2: {fsdp['failed']}")
    elif fsdp is not None and "steps" in fsdp:
        problems += [f"FSDP2 {p}" for p in scale_fsdp.failures(fsdp, scale_fsdp.MODES, tuple(args.fsdp_layouts))]
    for line in problems:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if problems else 0


def _scale_fsdp(args: argparse.Namespace, config, result: dict[str, Any], progress) -> dict[str, Any]:
    """The FSDP2 part under torchrun, unless the bytes model says the ranks would not fit."""
    from . import scale
    from .scale_fsdp import FsdpConfig, launch

    numel = args.fsdp_size or max(config.sizes)
    ranks = args.fsdp_ranks
    start = next((r["start_rss_bytes"] for r in result["records"] if "start_rss_bytes" in r), scale.GIB)
    per_param = scale.METHODS["eupmu-explicit"].peak_bytes_per_param
    # the single-process reference runs alone first; then every rank holds its shard of everything
    need = max(start + per_param * numel, ranks * (start + max(per_param * numel / ranks, 2 * numel)))
    budget = result["memory_budget_bytes"]
    if budget is not None and need > budget:
        progress(f"FSDP2 at {numel:.3g}: skipped (predicted {need / scale.GIB:.1f} GiB > {budget / scale.GIB:.1f})")
        return {"skipped": f"predicted {need / scale.GIB:.1f} GiB > {budget / scale.GIB:.1f} GiB available"}
    progress(f"FSDP2 at {numel:.3g} parameters on {ranks} gloo ranks (predicted {need / scale.GIB:.1f} GiB in all)")
    cfg = FsdpConfig(numel, str(args.out / "fsdp"), config.vocab, config.batch, config.seq, config.lr, config.seed,
                     layouts=tuple(args.fsdp_layouts))
    return launch(cfg, ranks)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "iteration":
        return iteration_main(argv[1:])
    if argv and argv[0] == "scale":
        return scale_main(argv[1:])
    if argv and argv[0] == "violations":
        from .violations import main as violations_main

        return violations_main(argv[1:])
    if argv and argv[0] == "step":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_methods:
        for method in METHODS.values():
            print(f"{method.name:24s} {method.kind:8s} {method.description}")
        return 0
    check_arguments(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = make_config(args)
    warn_if_busy(config)
    command = "eupmu-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = run(config, command, _progress_factory(not args.no_progress))
    results["targets"] = targets(results["records"])
    print_summary(results)
    written = write_outputs(results, args.out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(str(p) for p in written))
    failed = [s for s in results["skipped"] if s.get("failed")]
    if failed:
        print(f"{len(failed)} case(s) failed (see above and results.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
