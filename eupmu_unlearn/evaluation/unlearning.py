"""Unlearning runs of the image benchmark: batches of class-labelled samples on the shared step loop.

Every method of :mod:`eupmu_unlearn.methods` runs through :mod:`eupmu_unlearn.loop` with the same
base rule (SGD, momentum 0.9, weight decay 5e-4) and the same batches. Methods that take the
application's forget loss use random-label cross-entropy; random labels are drawn afresh each
step among the classes other than the true one. Surgery methods see the forget and retain batch
in one forward pass. No step reads a device value back to the host.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import methods
from ..loop import (BaseRule, Losses, Objective, PlainExtras, Stepper, build_optimizer, run_steps, saliency_mask,
                    stack_records)
from ..losses import NPO_BETA, forget_loss
from ..methods import Hyper, Method
from .data import Scenario
from .metrics import accuracy

DEFAULT_FORGET_LOSS = "random-label"
SUPPORTED = methods.available(("ga", "npo", "random-label"), DEFAULT_FORGET_LOSS, image=True)
TRACE_RETAIN_SAMPLES = 5000


@dataclass(frozen=True)
class Schedule:
    """What every method shares: batches, base rule, default length."""

    epochs: int = 5  # passes over the retain set (methods whose knob is not the length)
    forget_batch: int = 32
    retain_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    exact_dual: bool = True  # implicit mode: re-evaluate the losses after the step (one forward)
    epochs_override: int | None = None  # forces every method's length (CLI --epochs)

    def epochs_for(self, method: Method, hyper: Hyper) -> int:
        if self.epochs_override is not None:
            return self.epochs_override
        if method.knob == "epochs" and hyper.knob is not None:
            return int(hyper.knob)
        return self.epochs

    def base_rule(self, lr: float) -> BaseRule:
        return BaseRule("sgd", lr, weight_decay=self.weight_decay, momentum=self.momentum)


@dataclass
class Batch:
    x_forget: Tensor
    y_forget: Tensor
    y_random: Tensor  # a label other than the true one, per forget sample
    x_retain: Tensor
    y_retain: Tensor
    forget_reference: Tensor | None = None  # NPO: the starting model's log p(y|x) of the forget samples


@dataclass
class ClassSide:
    """Logits of class-labelled samples as a :class:`eupmu_unlearn.losses.Side`."""

    logits: Tensor
    labels: Tensor
    random_labels: Tensor | None = None
    reference_log_prob: Tensor | None = None

    def cross_entropy(self) -> Tensor:
        return F.cross_entropy(self.logits, self.labels)

    def random_label_cross_entropy(self) -> Tensor:
        return F.cross_entropy(self.logits, self.random_labels)

    def log_prob(self) -> Tensor:
        return class_log_prob(self.logits, self.labels)


def class_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


class ClassObjective(Objective):
    def __init__(self, forget_loss: str) -> None:
        self.forget_loss_name = forget_loss

    def _forget(self, logits: Tensor, batch: Batch) -> Tensor:
        side = ClassSide(logits, batch.y_forget, batch.y_random, batch.forget_reference)
        return forget_loss(self.forget_loss_name, side, NPO_BETA)

    def forget_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self._forget(model(batch.x_forget), batch)

    def retain_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch.x_retain), batch.y_retain)

    def relabel_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(torch.cat([batch.x_forget, batch.x_retain]))
        return F.cross_entropy(logits, torch.cat([batch.y_random, batch.y_retain]))

    def losses(self, model: nn.Module, batch: Batch) -> Losses:
        """Both losses from one forward pass over the forget and retain batch."""
        logits = model(torch.cat([batch.x_forget, batch.x_retain]))
        n = batch.x_forget.shape[0]
        return Losses(lambda: self._forget(logits[:n], batch),
                      lambda: F.cross_entropy(logits[n:], batch.y_retain), shared_graph=True)


def make_stepper(method: Method, hyper: Hyper, model: nn.Module, schedule: Schedule, scenario: Scenario | None = None,
                 steps: int = 1) -> Stepper:
    """The step of ``method``; SalUn computes its mask from ``scenario``'s forget set here, and
    l1-sparse's penalty decays over ``steps``."""
    base = schedule.base_rule(hyper.lr)
    extras = PlainExtras()
    if method.knob == "keep":  # SalUn: the optimizer's weight decay moves under the mask
        if scenario is None:
            raise ValueError(f"method {method.name} needs the scenario's forget set for its saliency mask")
        extras = PlainExtras(mask=forget_saliency(model, scenario, float(hyper.knob)),
                             masked_weight_decay=base.weight_decay)
        base = BaseRule(base.rule, base.lr, weight_decay=0.0, momentum=base.momentum, backend=base.backend)
    elif method.knob == "l1":
        extras = PlainExtras(l1=float(hyper.knob), steps=steps)
    opt = build_optimizer(method, model, base, methods.optimizer_options(method, hyper))
    objective = ClassObjective(method.forget_loss_or(DEFAULT_FORGET_LOSS))
    return Stepper(method, model, opt, objective, schedule.exact_dual, extras)


def forget_saliency(model: nn.Module, scenario: Scenario, keep: float) -> list[Tensor]:
    """SalUn's weight saliency: the magnitude of the gradient of the forget set's cross-entropy
    (its true labels; the sign of a gradient-ascent loss does not change the magnitude) at the
    starting weights; the ``keep`` share with the largest magnitude is masked in."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    F.cross_entropy(model(scenario.forget.x), scenario.forget.y).backward()
    mask = saliency_mask(params, keep)
    for p in params:
        p.grad = None
    return mask


class IndexStream:
    """Endless mini-batches of indices, reshuffled at every pass over ``n`` samples.

    Every batch is full: one that would run past the end of a pass is completed from the start
    of the next (reshuffled) pass, so no step sees a remainder of a few samples. (A two-sample
    forget batch whose random-label loss happens to be small gets its gradient multiplied by
    1/L_f under the log transform of the reference dual, a large, noisy step.) Indices are drawn
    on the generator's device, so batches never cross from host to device.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        if n <= 0:
            raise ValueError("cannot draw batches from an empty set")
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self._order = self._shuffle()
        self._pos = 0

    def _shuffle(self) -> Tensor:
        return torch.randperm(self.n, generator=self.generator, device=self.generator.device)

    def next(self) -> Tensor:
        if self._pos >= self._order.shape[0]:
            self._order, self._pos = self._shuffle(), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        missing = self.batch_size - idx.shape[0]
        if missing > 0:  # the next pass opens with the samples that complete this batch (none repeated)
            order = self._shuffle()
            fresh = order[~torch.isin(order, idx)]
            fill = fresh[:missing]
            idx = torch.cat([idx, fill])
            self._order, self._pos = order[~torch.isin(order, fill)], 0
        return idx


class BatchSampler:
    """Forget and retain batches of a scenario, with random wrong labels (and NPO references)."""

    def __init__(self, scenario: Scenario, num_classes: int, schedule: Schedule, seed: int,
                 forget_reference: Tensor | None) -> None:
        self.scenario, self.num_classes, self.forget_reference = scenario, num_classes, forget_reference
        self.device = scenario.forget.x.device
        batch_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.label_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.forget_idx = IndexStream(len(scenario.forget), schedule.forget_batch, batch_gen)
        self.retain_idx = IndexStream(len(scenario.retain), schedule.retain_batch, batch_gen)

    def draw(self) -> Batch:
        f_idx, r_idx = self.forget_idx.next(), self.retain_idx.next()
        forget, retain = self.scenario.forget, self.scenario.retain
        y_forget = forget.y[f_idx]
        shift = torch.randint(1, self.num_classes, y_forget.shape, generator=self.label_gen, device=self.device)
        reference = None if self.forget_reference is None else self.forget_reference[f_idx]
        return Batch(forget.x[f_idx], y_forget, (y_forget + shift) % self.num_classes, retain.x[r_idx],
                     retain.y[r_idx], reference)


@torch.no_grad()
def reference_log_probs(model: nn.Module, scenario: Scenario) -> Tensor:
    return class_log_prob(model(scenario.forget.x), scenario.forget.y)


@dataclass
class UnlearnRun:
    model: nn.Module
    seconds: float
    steps: int
    per_step: dict[str, list[float]] = field(default_factory=dict)
    trace: dict[str, list[float]] = field(default_factory=dict)  # step, forget_acc, retain_acc


def total_steps(method: Method, hyper: Hyper, scenario: Scenario, schedule: Schedule) -> int:
    return schedule.epochs_for(method, hyper) * math.ceil(len(scenario.retain) / schedule.retain_batch)


class Tracer:
    """Forget and retain accuracy of the model at chosen steps (its time is not counted in RTE)."""

    def __init__(self, scenario: Scenario, steps: int, points: int) -> None:
        self.forget = scenario.forget
        self.retain = scenario.retain.subset(torch.arange(min(len(scenario.retain), TRACE_RETAIN_SAMPLES)))
        self.at = set() if points <= 0 else {round(i * steps / points) for i in range(points + 1)}
        self.values: dict[str, list[float]] = {"step": [], "forget_acc": [], "retain_acc": []}

    def maybe_record(self, step: int, model: nn.Module) -> float:
        """Record at ``step`` if it is a trace point; returns the seconds spent."""
        if step not in self.at:
            return 0.0
        device = next(model.parameters()).device
        if device.type == "cuda":  # finish the timed steps first, so their time is not discounted
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.values["step"].append(float(step))
        self.values["forget_acc"].append(accuracy(model, self.forget))
        self.values["retain_acc"].append(accuracy(model, self.retain))
        model.train()
        return time.perf_counter() - start


def unlearn(method: Method, hyper: Hyper, model: nn.Module, scenario: Scenario, num_classes: int,
            schedule: Schedule, seed: int, trace_points: int = 0, max_steps: int | None = None,
            on_step: Callable[[int, nn.Module], None] | None = None) -> UnlearnRun:
    """Run one method in place on ``model``; the scenario's tensors must be on the model's device.

    ``on_step(k, model)`` runs after step k (untimed), e.g. to keep a copy of the model there."""
    device = next(model.parameters()).device
    steps = total_steps(method, hyper, scenario, schedule)
    if max_steps is not None:
        steps = min(steps, max_steps)
    tracer = Tracer(scenario, steps, trace_points)
    model.train()
    needs_reference = method.uses_forget_loss and method.forget_loss_or(DEFAULT_FORGET_LOSS) == "npo"
    sampler = BatchSampler(scenario, num_classes, schedule, seed,
                           reference_log_probs(model, scenario) if needs_reference else None)
    tracer.maybe_record(0, model)  # before the clock starts: not part of the run time
    untimed: list[float] = []
    start = time.perf_counter()
    stepper = make_stepper(method, hyper, model, schedule, scenario, steps)  # SalUn's mask is part of its run
    def after(step: int) -> None:
        untimed.append(tracer.maybe_record(step, model))
        if on_step is not None:
            begin = time.perf_counter()
            on_step(step, model)
            untimed.append(time.perf_counter() - begin)

    records = run_steps(stepper, sampler.draw, steps, after)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start - sum(untimed)
    model.eval()
    return UnlearnRun(model, seconds, steps, stack_records(records), tracer.values)
