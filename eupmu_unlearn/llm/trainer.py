"""The EUPMU methods run through the Hugging Face ``Trainer`` integration (``EUPMUTrainer``).

Same data, losses and hyperparameters as :func:`eupmu_kernels.llm.training.unlearn`, with the
Trainer's own loop: forget/retain pairs from ``ForgetRetainDataset`` (retain batch size = forget
batch size), a constant learning rate, no checkpoints, no reports. NPO's reference model is a
frozen copy of the starting model held by the trainer (one more model in memory than the
hand-written loop, which precomputes the reference log-probabilities). The per-step trace comes
from the Trainer's log, written at every step: one read of device values per step, where the
hand-written loop reads nothing back until it has finished.
"""

from __future__ import annotations

import tempfile
from typing import Sequence

import torch

from .codec import Codec
from .data import QAItem
from .training import UnlearnConfig, UnlearnTrace, encode_example

TRAINER_METHODS = {"eupmu_implicit_hf": "implicit", "eupmu_explicit_hf": "explicit"}


def _examples(codec: Codec, items: Sequence[QAItem]) -> list[dict[str, list[int]]]:
    out = []
    for it in items:
        ids, labels = encode_example(codec, it.question, it.answer)
        out.append({"input_ids": ids, "labels": labels})
    return out


def unlearn_with_trainer(method: str, model: torch.nn.Module, codec: Codec, forget: Sequence[QAItem],
                         retain: Sequence[QAItem], cfg: UnlearnConfig) -> UnlearnTrace:
    """Run ``cfg.steps`` optimizer steps of ``method`` (a key of TRAINER_METHODS) with EUPMUTrainer."""
    if method not in TRAINER_METHODS:
        raise ValueError(f"method must be one of {tuple(TRAINER_METHODS)}, got {method!r}")
    from transformers import PrinterCallback, TrainingArguments

    from ..hf import EUPMUConfig, EUPMUTrainer, ForgetRetainCollator, ForgetRetainDataset

    dataset = ForgetRetainDataset(_examples(codec, forget), _examples(codec, retain), seed=cfg.seed)
    eupmu = EUPMUConfig(mode=TRAINER_METHODS[method], forget_loss=cfg.eupmu_forget_loss, npo_beta=cfg.npo_beta,
                        dual_update="exact" if cfg.exact_dual else "lagged", max_grad_norm=cfg.max_grad_norm,
                        tolerance=cfg.tolerance, dual=cfg.dual, dual_lr=cfg.dual_lr, w_init=cfg.w_init,
                        optimizer_kwargs={"backend": cfg.backend} if cfg.backend else {})
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=cfg.steps,
                                 per_device_train_batch_size=cfg.forget_batch_size,
                                 learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=cfg.weight_decay, max_grad_norm=0.0, logging_steps=1,
                                 save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
                                 logging_nan_inf_filter=False,
                                 dataloader_num_workers=0, disable_tqdm=True, use_cpu=_on_cpu(model))
        trainer = EUPMUTrainer(model=model, args=args, train_dataset=dataset, eupmu_config=eupmu,
                               data_collator=ForgetRetainCollator(pad_token_id=codec.pad_id))
        trainer.remove_callback(PrinterCallback)  # the per-step log goes into the trace instead
        trainer.train()
    model.eval()
    return _trace_from_log(trainer.state.log_history, TRAINER_METHODS[method])


def _on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _trace_from_log(history: list[dict], mode: str) -> UnlearnTrace:
    key = "eupmu_w" if mode == "implicit" else "eupmu_lambda"
    rows = [h for h in history if "forget_loss" in h]
    return UnlearnTrace(forget_loss=[float(h["forget_loss"]) for h in rows],
                        retain_loss=[float(h["retain_loss"]) for h in rows],
                        multiplier=[float(h.get(key, float("nan"))) for h in rows])
