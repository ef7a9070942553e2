"""Batching, losses, fine-tuning, and unlearning loops driven by :class:`eupmu_kernels.EUPMU`.

Unlearning methods (all of them step through the library's optimizer, AdamW rule):

================  ===============================================================================
method            per step
================  ===============================================================================
ga                gradient ascent on the forget NLL (one backward pass, plain fused update)
graddiff          explicit mode, ``surgery="graddiff"``: d = g_f(GA) + alpha g_r
npo               negative preference optimisation against the starting model (one backward)
npo_graddiff      explicit mode, ``surgery="graddiff"`` with the NPO forget loss
eupmu_implicit    implicit surgery: ``opt.combine(forget, retain).backward(); opt.step()``,
                  then the exact dual update from a no-grad retain forward
eupmu_explicit    unilateral surgery: ``retain.backward(); opt.stash_retain_grad();
                  forget.backward(); opt.step()``
================  ===============================================================================

NPO's reference model is the model the unlearning starts from, so its log-probabilities are
computed once before the first step: no second model is held in memory.
Per-step losses stay on the device and are read back once, after the loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import npo_from_log_ratio
from eupmu_kernels import EUPMU
from .codec import Codec
from .data import QAItem

IGNORE = -100
METHODS = ("ga", "graddiff", "npo", "npo_graddiff", "eupmu_implicit", "eupmu_explicit")
FORGET_LOSSES = ("ga", "npo")

Progress = Callable[[str], None]


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_example(codec: Codec, question: str, answer: str, with_end: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt is masked out of the labels; the end marker is learned."""
    prompt = codec.prompt_ids(question)
    target = codec.answer_ids(answer) + ([codec.end_id] if with_end else [])
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded batch (padding is masked out of attention and labels)."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return Batch(ids, mask, labels)


def qa_batch(codec: Codec, items: Sequence[QAItem], device: torch.device, with_end: bool = True) -> Batch:
    return collate([encode_example(codec, it.question, it.answer, with_end) for it in items], codec.pad_id).to(device)


def token_nll(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood (B, T-1) of the next token, and the mask of scored tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll, targets != IGNORE


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Sum of the answer tokens' log-probabilities per row, and the number of answer tokens."""
    nll, mask = token_nll(model, batch)
    return -(nll * mask).sum(dim=1), mask.sum(dim=1)


def nll_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean NLL over all answer tokens of the batch (the fine-tuning and retain loss)."""
    nll, mask = token_nll(model, batch)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def npo_loss(model: torch.nn.Module, batch: Batch, reference_logprob: Tensor, beta: float) -> Tensor:
    """NPO: (2/beta) E[log(1 + (pi/pi_ref)^beta)] on sequence log-probabilities; >= 0, minimised."""
    logprob, _ = sequence_logprob(model, batch)
    return npo_from_log_ratio(logprob - reference_logprob, beta)


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
            batch = collate([examples[i] for i in order[start:start + cfg.batch_size]], codec.pad_id).to(device)
            opt.zero_grad(set_to_none=True)
            loss = nll_loss(model, batch)
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

    The implicit mode defaults to the ``"reference"`` dual rule: log-transformed losses put the
    NPO forget loss (about 14 at the start) and the retain NLL (about 0.05 after fine-tuning) on
    one scale, and Adam on w moves the multiplier by about ``dual_lr`` per step whatever the
    size of the observed retain-loss change.
    """

    steps: int = 15
    lr: float = 2e-5
    forget_batch_size: int = 10
    retain_batch_size: int = 10
    weight_decay: float = 0.0
    npo_beta: float = 0.1
    graddiff_alpha: float = 1.0
    eupmu_forget_loss: str = "npo"
    tolerance: float = 0.0
    dual: str = "reference"
    dual_lr: float | None = None
    dual_step_scale: str | None = None
    w_init: float = 0.0
    exact_dual: bool = True
    max_grad_norm: float | None = None
    seed: int = 0
    backend: str | None = None


@dataclass
class UnlearnTrace:
    """Per-step values: forget and retain loss (NaN where a method does not compute the retain
    loss) and the surgery multiplier (w in implicit mode, lambda* in explicit mode, else 0)."""

    forget_loss: list[float] = field(default_factory=list)
    retain_loss: list[float] = field(default_factory=list)
    multiplier: list[float] = field(default_factory=list)


def forget_loss_of(method: str, cfg: UnlearnConfig) -> str:
    if method in ("ga", "graddiff"):
        return "ga"
    if method in ("npo", "npo_graddiff"):
        return "npo"
    if method in ("eupmu_implicit", "eupmu_explicit"):
        return cfg.eupmu_forget_loss
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def make_optimizer(method: str, model: torch.nn.Module, cfg: UnlearnConfig) -> EUPMU:
    common = dict(lr=cfg.lr, rule="adamw", weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                  backend=cfg.backend)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if method in ("ga", "npo"):
        return EUPMU(params, mode="implicit", **common)
    if method in ("graddiff", "npo_graddiff"):
        return EUPMU(params, mode="explicit", surgery="graddiff", alpha=cfg.graddiff_alpha, **common)
    if method == "eupmu_explicit":
        return EUPMU(params, mode="explicit", surgery="ungrad", tolerance=cfg.tolerance, **common)
    if method == "eupmu_implicit":
        return EUPMU(params, mode="implicit", dual=cfg.dual, dual_lr=cfg.dual_lr, tolerance=cfg.tolerance,
                     w_init=cfg.w_init, dual_step_scale=cfg.dual_step_scale, **common)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


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


class _ForgetLoss:
    """GA or NPO forget loss over index batches of the forget examples."""

    def __init__(self, kind: str, model: torch.nn.Module, examples: list[tuple[list[int], list[int]]],
                 pad_id: int, device: torch.device, beta: float) -> None:
        if kind not in FORGET_LOSSES:
            raise ValueError(f"forget loss must be one of {FORGET_LOSSES}, got {kind!r}")
        self.kind, self.examples, self.pad_id, self.device, self.beta = kind, examples, pad_id, device, beta
        self.reference: Tensor | None = None
        if kind == "npo":
            self.reference = self._reference_logprobs(model)

    def _reference_logprobs(self, model: torch.nn.Module) -> Tensor:
        with torch.no_grad():
            logprob, _ = sequence_logprob(model, collate(self.examples, self.pad_id).to(self.device))
        return logprob

    def __call__(self, model: torch.nn.Module, indices: list[int]) -> Tensor:
        batch = collate([self.examples[i] for i in indices], self.pad_id).to(self.device)
        if self.kind == "ga":
            return -nll_loss(model, batch)
        assert self.reference is not None
        reference = self.reference[torch.tensor(indices, device=self.device)]
        return npo_loss(model, batch, reference, self.beta)


def unlearn(method: str, model: torch.nn.Module, codec: Codec, forget: Sequence[QAItem],
            retain: Sequence[QAItem], cfg: UnlearnConfig) -> UnlearnTrace:
    """Run ``cfg.steps`` unlearning steps of ``method`` on ``model`` in place."""
    device = next(model.parameters()).device
    kind = forget_loss_of(method, cfg)
    forget_examples = [encode_example(codec, it.question, it.answer) for it in forget]
    retain_examples = [encode_example(codec, it.question, it.answer) for it in retain]
    model.train()
    forget_loss = _ForgetLoss(kind, model, forget_examples, codec.pad_id, device, cfg.npo_beta)
    opt = make_optimizer(method, model, cfg)
    forget_cycle = _Cycler(len(forget_examples), cfg.seed)
    retain_cycle = _Cycler(len(retain_examples), cfg.seed + 1)
    nan = torch.full((), float("nan"), device=device)
    zero = torch.zeros((), device=device)
    recorded: list[tuple[Tensor, Tensor, Tensor]] = []
    for _ in range(cfg.steps):
        f_idx = forget_cycle.take(cfg.forget_batch_size)
        retain_batch = collate([retain_examples[i] for i in retain_cycle.take(cfg.retain_batch_size)],
                               codec.pad_id).to(device)
        opt.zero_grad()
        if method in ("ga", "npo"):
            f_loss, r_loss = forget_loss(model, f_idx), nan
            f_loss.backward()
            opt.step()
            multiplier = zero
        elif method == "eupmu_implicit":
            f_loss, r_loss = forget_loss(model, f_idx), nll_loss(model, retain_batch)
            opt.combine(f_loss, r_loss).backward()
            opt.step()
            if cfg.exact_dual:
                with torch.no_grad():
                    opt.update_dual(nll_loss(model, retain_batch))
            multiplier = opt.w.detach().clone()
        else:  # two backward passes: retain first, then forget
            r_loss = nll_loss(model, retain_batch)
            r_loss.backward()
            opt.stash_retain_grad()
            f_loss = forget_loss(model, f_idx)
            f_loss.backward()
            opt.step()
            multiplier = opt.stats()["lambda"].detach().clone()
        recorded.append((f_loss.detach(), r_loss.detach(), multiplier))
    model.eval()
    return _trace(recorded)


def _trace(recorded: list[tuple[Tensor, Tensor, Tensor]]) -> UnlearnTrace:
    if not recorded:
        return UnlearnTrace()
    values = torch.stack([torch.stack([f.float(), r.float(), m.float()]) for f, r, m in recorded]).cpu()
    return UnlearnTrace(forget_loss=values[:, 0].tolist(), retain_loss=values[:, 1].tolist(),
                        multiplier=values[:, 2].tolist())
