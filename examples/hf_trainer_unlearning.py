"""Unlearning with the Hugging Face Trainer and EUPMU, end to end on a small model built locally.

A small Llama is first trained (with the plain ``Trainer``) on two token "languages": forget
sequences count up in steps of 1, retain sequences in steps of 3. ``EUPMUTrainer`` then unlearns
the first while keeping the second. Nothing is downloaded; it runs on a CPU in about a minute.

    python examples/hf_trainer_unlearning.py                      # implicit mode, NPO forget loss
    python examples/hf_trainer_unlearning.py --forget-loss ga --accumulation 2 --dual-update exact
    python examples/hf_trainer_unlearning.py --mode explicit --rule sgd --lr 0.1

With a real model, replace ``small_llama()`` by ``AutoModelForCausalLM.from_pretrained(...)`` and
the token sequences by tokenised forget and retain texts (e.g. TOFU's forget10 / retain90 splits).
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from eupmu_kernels.integrations.hf import EUPMUConfig, EUPMUTrainer, ForgetRetainCollator, ForgetRetainDataset

VOCAB = 64
LENGTH = 16


def counting_sequences(count: int, stride: int, seed: int) -> list[dict[str, list[int]]]:
    """Token sequences start, start + stride, ... (mod the vocabulary; id 0 is the pad token)."""
    rng = random.Random(seed)
    sequences = []
    for _ in range(count):
        start = rng.randrange(VOCAB - 1)
        sequences.append({"input_ids": [(start + stride * k) % (VOCAB - 1) + 1 for k in range(LENGTH)]})
    return sequences


def small_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
                         pad_token_id=0)
    return LlamaForCausalLM(config)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: list[dict[str, list[int]]]) -> float:
    model.eval()
    batch = ForgetRetainCollator()(examples)
    return float(model(**batch).loss)


def common_arguments(out_dir: str, steps: int, lr: float, accumulation: int = 1) -> dict:
    return dict(output_dir=out_dir, max_steps=steps, learning_rate=lr, per_device_train_batch_size=16,
                gradient_accumulation_steps=accumulation, logging_steps=max(1, steps // 5), report_to=[],
                save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                logging_nan_inf_filter=False)  # the filter reads every micro-batch loss on the host


def train_both_languages(model: torch.nn.Module, examples: list, out_dir: str) -> None:
    args = TrainingArguments(**common_arguments(out_dir, steps=300, lr=3e-3), weight_decay=0.0)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=ForgetRetainCollator()).train()


def unlearn(model: torch.nn.Module, forget: list, retain: list, out_dir: str, options: argparse.Namespace) -> list:
    # Gradient ascent is a negative loss: the default dual rule's log transform needs positive ones.
    dual = options.dual or ("paper" if options.forget_loss == "ga" else EUPMUConfig.dual)
    config = EUPMUConfig(mode=options.mode, forget_loss=options.forget_loss, rule=options.rule,
                         tolerance=options.tolerance, dual=dual, dual_update=options.dual_update)
    args = TrainingArguments(**common_arguments(out_dir, options.steps, options.lr, options.accumulation),
                             weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant")
    trainer = EUPMUTrainer(model=model, args=args, train_dataset=ForgetRetainDataset(forget, retain),
                           eupmu_config=config)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "forget_loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="implicit")
    parser.add_argument("--forget-loss", choices=("ga", "npo"), default="npo")
    parser.add_argument("--rule", choices=("adamw", "adam", "sgd"), default="adamw")
    parser.add_argument("--dual", choices=("reference", "paper"), default=None,
                        help="implicit-mode dual rule (default: reference, or paper with --forget-loss ga)")
    parser.add_argument("--dual-update", choices=("lagged", "exact"), default="lagged")
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    forget, retain = counting_sequences(64, 1, options.seed), counting_sequences(256, 3, options.seed + 1)
    held_out_retain = counting_sequences(64, 3, options.seed + 2)
    model = small_llama(options.seed)
    with tempfile.TemporaryDirectory() as out_dir:
        train_both_languages(model, forget + retain, out_dir)
        before = (mean_loss(model, forget), mean_loss(model, held_out_retain))
        logs = unlearn(model, forget, retain, out_dir, options)
    after = (mean_loss(model, forget), mean_loss(model, held_out_retain))

    print(f"\nunlearning with EUPMU: mode={options.mode}, forget loss={options.forget_loss}")
    for entry in logs:
        extra = {k: round(v, 4) for k, v in entry.items() if k.startswith("eupmu_")}
        print(f"  step {entry['step']:3d}  L_f {entry['forget_loss']:8.4f}  L_r {entry['retain_loss']:7.4f}  {extra}")
    print(f"cross-entropy on the forget set:          {before[0]:.3f} -> {after[0]:.3f}  (should rise)")
    print(f"cross-entropy on held-out retain examples: {before[1]:.3f} -> {after[1]:.3f}  (should stay low)")


if __name__ == "__main__":
    main()
