"""EUPMU methods run through the Hugging Face ``Trainer`` integration (``EUPMUTrainer``).

A method name with the suffix ``-hf`` (``eupmu-hf``, ``ungrad-hf``, ...) runs the method through
the Trainer instead of the pipeline's own loop: same data, losses and hyperparameters as
:func:`eupmu_unlearn.llm.training.unlearn`, with the Trainer's loop: forget/retain pairs from
``ForgetRetainDataset`` (retain batch size = forget batch size), a constant learning rate, no
checkpoints, no reports. NPO's reference model is a frozen copy of the starting model held by the
trainer (one more model in memory than the pipeline's loop, which precomputes the reference
log-probabilities). The per-step trace comes from the Trainer's log, written at every step: one
read of device values per step, where the pipeline's loop reads nothing back until it has
finished. Plain methods and FAMO (whose exact dual update needs the forget loss after the step)
have no Trainer variant.
"""

from __future__ import annotations

import tempfile
from typing import Sequence

import torch

from ..methods import Method
from .codec import Codec
from .data import QAItem
from .tokens import encode_example
from .training import SUPPORTED, UnlearnConfig, UnlearnTrace, forget_loss_of, optimizer_options, resolve

SUFFIX = "-hf"
OLD_SPELLINGS = {"eupmu_implicit_hf": "eupmu-hf", "eupmu_explicit_hf": "ungrad-hf"}
TRAINER_METHODS = tuple(f"{name}{SUFFIX}" for name in
                        ("eupmu", *(m.name for m in SUPPORTED if m.family != "plain" and m.option != "famo")))


def through_trainer(name: str) -> str | None:
    """The method behind a Trainer variant's name (``ungrad-hf`` -> ``ungrad``), else None."""
    name = OLD_SPELLINGS.get(name, name)
    return name[:-len(SUFFIX)] if name in TRAINER_METHODS else None


def unlearn_with_trainer(name: str, model: torch.nn.Module, codec: Codec, forget: Sequence[QAItem],
                         retain: Sequence[QAItem], cfg: UnlearnConfig) -> UnlearnTrace:
    """Run ``cfg.steps`` optimizer steps of a Trainer variant (``eupmu-hf``, ...) with EUPMUTrainer."""
    base_name = through_trainer(name)
    if base_name is None:
        raise ValueError(f"{name!r} is not a Trainer method; choose from {', '.join(TRAINER_METHODS)}")
    method = resolve(base_name, cfg)
    from transformers import PrinterCallback, TrainingArguments

    from ..hf import EUPMUTrainer, ForgetRetainCollator, ForgetRetainDataset

    dataset = ForgetRetainDataset(_examples(codec, forget), _examples(codec, retain), seed=cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=cfg.steps,
                                 per_device_train_batch_size=cfg.forget_batch_size,
                                 learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=cfg.weight_decay, max_grad_norm=0.0, logging_steps=1,
                                 save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
                                 logging_nan_inf_filter=False,
                                 dataloader_num_workers=0, disable_tqdm=True, use_cpu=_on_cpu(model))
        trainer = EUPMUTrainer(model=model, args=args, train_dataset=dataset, eupmu_config=trainer_config(method, cfg),
                               data_collator=ForgetRetainCollator(pad_token_id=codec.pad_id))
        trainer.remove_callback(PrinterCallback)  # the per-step log goes into the trace instead
        trainer.train()
    model.eval()
    return _trace_from_log(trainer.state.log_history, method.family)


def trainer_config(method: Method, cfg: UnlearnConfig):
    """The ``EUPMUConfig`` of ``method`` with the options the pipeline's own loop would use."""
    from ..hf import EUPMUConfig

    options = optimizer_options(method, cfg)
    fields = {key: options.pop(key) for key in ("tolerance", "dual_lr", "w_init") if key in options}
    if cfg.backend:
        options["backend"] = cfg.backend
    return EUPMUConfig.for_method(method.name, forget_loss=forget_loss_of(method, cfg), npo_beta=cfg.npo_beta,
                                  simnpo_beta=cfg.simnpo_beta, simnpo_gamma=cfg.simnpo_gamma,
                                  dual_update="exact" if cfg.exact_dual else "lagged", optimizer_kwargs=options,
                                  **fields)


def _examples(codec: Codec, items: Sequence[QAItem]) -> list[dict[str, list[int]]]:
    return [encode_example(codec, it.question, it.answer) for it in items]


def _on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _trace_from_log(history: list[dict], mode: str) -> UnlearnTrace:
    key = "eupmu_w" if mode == "implicit" else "eupmu_lambda"
    rows = [h for h in history if "forget_loss" in h]
    return UnlearnTrace(forget_loss=[float(h["forget_loss"]) for h in rows],
                        retain_loss=[float(h["retain_loss"]) for h in rows],
                        multiplier=[float(h.get(key, float("nan"))) for h in rows])
