"""Fine-tuning, and the LLM pipeline's unlearning runs on the shared step loop.

Unlearning runs every method of :mod:`eupmu_unlearn.methods` that text allows (all but ``rl``,
which needs class labels) through :mod:`eupmu_unlearn.loop`, with AdamW as the base rule: the
surgery methods step through :class:`eupmu_kernels.EUPMU`, the plain ones (GA, NPO, FT) through
``torch.optim.AdamW``. Methods that take the application's forget loss (``eupmu``, ``ungrad``,
``pcgrad``, ``famo``) use ``UnlearnConfig.eupmu_forget_loss``, NPO by default.

Explicit UNGrad runs in gradient space (``ungrad``: the constraint on the combined gradient) or in
update space (``ungrad-update``: the constraint on the update AdamW applies; docs/design.md,
Update-space surgery). SimNPO (``simnpo``) is the GradDiff-style sum of the SimNPO forget loss
and the retain cross-entropy, as in its paper.

NPO's reference model is the model the unlearning starts from, so its log-probabilities of the
forget examples are computed once before the first step: no second model is held in memory.
Per-step losses stay on the device and are read back once, after the loop.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import methods
from ..loop import BaseRule, Objective, Stepper, build_optimizer, run_steps, stack_records
from ..losses import check_forget_loss
from ..methods import Hyper, Method
from .codec import Codec
from .data import QAItem
from .tokens import TEXT_FORGET_LOSSES, causal_lm_loss, encode_example, pad_examples, sequence_log_prob, \
    text_forget_loss, to_device

DEFAULT_FORGET_LOSS = "npo"
UPDATE_SPACE_SUFFIX = "-update"
UPDATE_SPACE_METHODS = ("ungrad" + UPDATE_SPACE_SUFFIX,)  # UNGrad in update space (the other rules have none)
METHODS = ("ga", "graddiff", "npo", "npo-graddiff", "simnpo", "eupmu", "ungrad",
           "ungrad-update")  # the pipeline's default set
SUPPORTED = methods.available(TEXT_FORGET_LOSSES, DEFAULT_FORGET_LOSS)


def split_space(name: str) -> tuple[str, str]:
    """(registry name, surgery space) of a pipeline method name: ``ungrad-update`` -> (``ungrad``, ``update``)."""
    if name in UPDATE_SPACE_METHODS:
        return name[:-len(UPDATE_SPACE_SUFFIX)], "update"
    return name, "gradient"

Progress = Callable[[str], None]


def qa_batch(codec: Codec, items: Sequence[QAItem], device: torch.device, with_end: bool = True) -> dict[str, Tensor]:
    examples = [encode_example(codec, it.question, it.answer, with_end) for it in items]
    return to_device(pad_examples(examples, codec.pad_id), device)


# ---------------------------------------------------------------------------------------- fine-tuning

@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 6
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0


def finetune(model: torch.nn.Module, codec: Codec, items: Sequence[QAItem], cfg: FinetuneConfig,
             progress: Progress | None = None) -> list[float]:
    """Teach the model the answers (AdamW, linear warm-up and decay); returns the loss per step."""
    device = next(model.parameters()).device
    examples = [encode_example(codec, it.question, it.answer) for it in items]
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then_linear(cfg.warmup_steps, total))
    rng = random.Random(cfg.seed)
    model.train()
    losses: list[Tensor] = []
    for epoch in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            batch = to_device(pad_examples([examples[i] for i in order[start:start + cfg.batch_size]], codec.pad_id),
                              device)
            opt.zero_grad(set_to_none=True)
            loss = causal_lm_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            schedule.step()
            losses.append(loss.detach())
        if progress is not None:
            progress(f"  epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1].item():.4f}")
    model.eval()
    return torch.stack(losses).tolist() if losses else []


def _warmup_then_linear(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# ---------------------------------------------------------------------------------------- unlearning

@dataclass(frozen=True)
class UnlearnConfig:
    """Unlearning hyperparameters shared by all methods (one AdamW learning rate and step count).

    ``dual`` is the preset that the name ``eupmu`` stands for. It defaults to ``"reference"``:
    log-transformed losses put the NPO forget loss (about 14 at the start) and the retain loss
    (about 0.05 after fine-tuning) on one scale, and Adam on w moves the multiplier by about
    ``dual_lr`` per step whatever the size of the observed retain-loss change.
    """

    steps: int = 15
    lr: float = 2e-5
    forget_batch_size: int = 10
    retain_batch_size: int = 10
    weight_decay: float = 0.0
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_gamma: float = 0.0
    graddiff_alpha: float = 1.0
    eupmu_forget_loss: str = DEFAULT_FORGET_LOSS
    tolerance: float = 0.0
    dual: str = methods.DEFAULT_DUAL
    dual_lr: float | None = None
    dual_step_scale: str | None = None
    w_init: float = 0.0
    exact_dual: bool = True
    seed: int = 0
    backend: str | None = None
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # a method's own values (tuned)

    def for_method(self, name: str) -> "UnlearnConfig":
        """This configuration with the values ``per_method`` holds for method ``name`` (a pipeline name)."""
        own = self.per_method.get(name)
        if own is None:  # "eupmu" stands for the --dual preset, whose values are under its own name
            base, space = split_space(name)
            canonical = methods.resolve(base, self.dual).name if base in methods.names() else base
            own = self.per_method.get(canonical + (UPDATE_SPACE_SUFFIX if space == "update" else ""), {})
        unknown = sorted(set(own) - {f.name for f in dataclasses.fields(self)} - {"per_method"})
        if unknown:
            raise ValueError(f"per_method[{name!r}] sets unknown unlearning options {unknown}")
        return dataclasses.replace(self, **own) if own else self

    def base_rule(self) -> BaseRule:
        return BaseRule("adamw", self.lr, weight_decay=self.weight_decay, backend=self.backend)


@dataclass
class UnlearnTrace:
    """Per-step values: forget and retain loss (NaN where a method does not compute one) and the
    surgery multiplier (w in implicit mode, lambda* in explicit mode, else 0)."""

    forget_loss: list[float] = field(default_factory=list)
    retain_loss: list[float] = field(default_factory=list)
    multiplier: list[float] = field(default_factory=list)


def resolve(name: str, cfg: UnlearnConfig) -> Method:
    method = methods.resolve(split_space(name)[0], cfg.dual)
    if method not in SUPPORTED:
        raise ValueError(f"method {name!r} needs class labels; on text choose from "
                         f"{', '.join(methods.names(SUPPORTED))}")
    return method


def forget_loss_of(method: Method, cfg: UnlearnConfig) -> str:
    return check_forget_loss(method.forget_loss_or(cfg.eupmu_forget_loss), TEXT_FORGET_LOSSES)


def optimizer_options(method: Method, cfg: UnlearnConfig, space: str = "gradient") -> dict[str, Any]:
    """The EUPMU options of ``method``: its knob set from the one configuration all methods share
    (``space``: UNGrad's surgery space)."""
    knobs = {"tolerance": cfg.tolerance, "err": -cfg.tolerance, "alpha": cfg.graddiff_alpha, "dual_lr": cfg.dual_lr}
    hyper = Hyper(cfg.lr, knobs.get(method.knob), cfg.tolerance if method.takes_tolerance else None)
    options = methods.optimizer_options(method, hyper)
    if method.family == "implicit":
        options = {"dual_lr": cfg.dual_lr, "w_init": cfg.w_init, "dual_step_scale": cfg.dual_step_scale, **options}
    if space != "gradient":
        options["surgery_space"] = space
    return options


@dataclass
class TextPair:
    forget: dict[str, Tensor]
    retain: dict[str, Tensor]
    forget_reference: Tensor | None  # NPO: the starting model's log-probabilities of the forget rows


class TextObjective(Objective):
    def __init__(self, forget_loss: str, npo_beta: float, simnpo_beta: float = 2.5, simnpo_gamma: float = 0.0) -> None:
        self.forget_loss_name, self.npo_beta = forget_loss, npo_beta
        self.simnpo_beta, self.simnpo_gamma = simnpo_beta, simnpo_gamma

    def forget_loss(self, model: torch.nn.Module, pair: TextPair) -> Tensor:
        return text_forget_loss(self.forget_loss_name, model, pair.forget, pair.forget_reference, self.npo_beta,
                                self.simnpo_beta, self.simnpo_gamma)

    def retain_loss(self, model: torch.nn.Module, pair: TextPair) -> Tensor:
        return causal_lm_loss(model, pair.retain)


class _Cycler:
    """Endless shuffled passes over indices 0..n-1 (reshuffled each pass, deterministic)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < min(k, self.n):
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


class PairSampler:
    """Forget and retain batches of the configured sizes, from seeded shuffled passes."""

    def __init__(self, forget: list[dict[str, list[int]]], retain: list[dict[str, list[int]]], pad_id: int,
                 cfg: UnlearnConfig, device: torch.device, forget_reference: Tensor | None) -> None:
        self.forget, self.retain, self.pad_id, self.cfg, self.device = forget, retain, pad_id, cfg, device
        self.forget_reference = forget_reference
        self.forget_cycle = _Cycler(len(forget), cfg.seed)
        self.retain_cycle = _Cycler(len(retain), cfg.seed + 1)

    def _batch(self, examples: list[dict[str, list[int]]], rows: list[int]) -> dict[str, Tensor]:
        return to_device(pad_examples([examples[i] for i in rows], self.pad_id), self.device)

    def draw(self) -> TextPair:
        f_rows = self.forget_cycle.take(self.cfg.forget_batch_size)
        r_rows = self.retain_cycle.take(self.cfg.retain_batch_size)
        reference = None
        if self.forget_reference is not None:
            reference = self.forget_reference[torch.tensor(f_rows, device=self.device)]
        return TextPair(self._batch(self.forget, f_rows), self._batch(self.retain, r_rows), reference)


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, examples: list[dict[str, list[int]]], pad_id: int,
                        device: torch.device) -> Tensor:
    return sequence_log_prob(model, to_device(pad_examples(examples, pad_id), device))


def unlearn(name: str, model: torch.nn.Module, codec: Codec, forget: Sequence[QAItem],
            retain: Sequence[QAItem], cfg: UnlearnConfig) -> UnlearnTrace:
    """Run ``cfg.steps`` unlearning steps of method ``name`` on ``model`` in place."""
    method = resolve(name, cfg)
    loss = forget_loss_of(method, cfg)
    device = next(model.parameters()).device
    forget_examples = [encode_example(codec, it.question, it.answer) for it in forget]
    retain_examples = [encode_example(codec, it.question, it.answer) for it in retain]
    model.train()
    needs_reference = method.uses_forget_loss and loss == "npo"
    reference = reference_log_probs(model, forget_examples, codec.pad_id, device) if needs_reference else None
    sampler = PairSampler(forget_examples, retain_examples, codec.pad_id, cfg, device, reference)
    opt = build_optimizer(method, model, cfg.base_rule(), optimizer_options(method, cfg, split_space(name)[1]))
    objective = TextObjective(loss, cfg.npo_beta, cfg.simnpo_beta, cfg.simnpo_gamma)
    stepper = Stepper(method, model, opt, objective, cfg.exact_dual)
    records = run_steps(stepper, sampler.draw, cfg.steps)
    model.eval()
    return trace_of(records)


def trace_of(records: list[dict[str, Tensor]]) -> UnlearnTrace:
    values = stack_records(records)
    missing = [math.nan] * len(records)
    multiplier = values.get("w", values.get("lambda", [0.0] * len(records)))
    return UnlearnTrace(forget_loss=values.get("forget_loss", missing), retain_loss=values.get("retain_loss", missing),
                        multiplier=multiplier)
