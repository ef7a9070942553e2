"""Unlearning methods: EUPMU and the baselines, each as a step over a (forget, retain) batch pair.

Surgery and weighting methods go through the library's optimizer :class:`eupmu_kernels.EUPMU`:

====================  =========  ================================  ===================  ==============
name                  family     direction                         forget loss          tuned knob
====================  =========  ================================  ===================  ==============
eupmu-paper           implicit   grad of f + w r, paper dual rule  random-label CE      dual_lr
eupmu-reference       implicit   grad of log f + w log r, Adam     random-label CE      err
                                 on w (the authors' practice)
ungrad                explicit   g_f + lambda* g_r                 random-label CE      tolerance
pcgrad                explicit   PCGrad of (g_f, g_r)              random-label CE      epochs
graddiff              explicit   g_f + alpha g_r                   negative CE (GA)     alpha
famo                  implicit   FAMO weighting                    random-label CE      dual_lr
ga                    plain      gradient ascent on the forget set negative CE          epochs
rl                    plain      CE on forget (random labels) and  random-label CE      epochs
                                 retain samples, one batch
ft                    plain      CE on the retain set only         none                 epochs
====================  =========  ================================  ===================  ==============

``eupmu`` is an alias of the default dual preset. Every method uses the same base rule (SGD,
momentum 0.9, weight decay 5e-4) and the same batches; random labels are drawn afresh each step
among the classes other than the true one. No step reads a device value back to the host.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from eupmu_kernels import EUPMU
from .data import Scenario
from .metrics import accuracy

FORGET_LOSSES = ("random_label", "negative_ce")
DEFAULT_DUAL = "reference"  # the better preset on this benchmark (see the README)
LR_GRID = (0.0003, 0.001, 0.003, 0.01)
TRACE_RETAIN_SAMPLES = 5000


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    family: str
    forget_loss: str | None
    knob: str | None  # "tolerance", "err", "alpha", "dual_lr" or "epochs"
    knob_grid: tuple[float, ...]
    default: tuple[float, float]  # (lr, knob) used when no stored selection covers the run
    option: str = ""  # the dual preset (implicit) or the surgery rule (explicit)
    fixed: tuple[tuple[str, object], ...] = ()  # further EUPMU keyword arguments, not tuned
    takes_tolerance: bool = False  # accepts a tolerance besides its knob (fixed at 0 unless overridden)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("eupmu-paper", "EUPMU (paper dual)", "implicit", "random_label", "dual_lr",
               (0.01, 0.1, 1.0), (0.001, 1.0), "paper", takes_tolerance=True),
    MethodSpec("eupmu-reference", "EUPMU (reference dual)", "implicit", "random_label", "err",
               (0.01, 0.03, 0.05), (0.001, 0.01), "reference"),
    MethodSpec("ungrad", "UNGrad (explicit)", "explicit", "random_label", "tolerance",
               (0.0, 0.1, 1.0), (0.001, 0.0), "ungrad"),
    MethodSpec("pcgrad", "PCGrad", "explicit", "random_label", "epochs", (2, 5, 10), (0.001, 10), "pcgrad"),
    MethodSpec("graddiff", "GradDiff", "explicit", "negative_ce", "alpha", (1.0, 3.0, 10.0), (0.001, 10.0), "graddiff"),
    MethodSpec("famo", "FAMO", "implicit", "random_label", "dual_lr", (0.0025, 0.025, 0.25), (0.01, 0.25), "famo"),
    MethodSpec("ga", "GA", "plain", "negative_ce", "epochs", (1, 2, 5), (0.001, 5), "ga"),
    MethodSpec("rl", "RL", "plain", "random_label", "epochs", (2, 5, 10), (0.003, 10), "rl"),
    MethodSpec("ft", "FT", "plain", None, "epochs", (2, 5, 10), (0.01, 10), "ft"),
)}
ALIASES = {"eupmu": f"eupmu-{DEFAULT_DUAL}"}
ALL_METHODS = tuple(METHODS)


def resolve(name: str) -> MethodSpec:
    """The spec behind a method name or alias (``eupmu`` is the default dual preset)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        known = ", ".join([*ALIASES, *METHODS])
        raise ValueError(f"unknown method {name!r}; known: {known}")
    return METHODS[key]


@dataclass(frozen=True)
class Hyper:
    """The tuned values of one method: learning rate and its one knob."""

    lr: float
    knob: float | None = None
    tolerance: float | None = None  # only for methods that take one besides their knob

    def describe(self, spec: MethodSpec) -> dict[str, float | None]:
        out = {"lr": self.lr, spec.knob or "knob": self.knob}
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


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

    def epochs_for(self, spec: MethodSpec, hyper: Hyper) -> int:
        if self.epochs_override is not None:
            return self.epochs_override
        if spec.knob == "epochs" and hyper.knob is not None:
            return int(hyper.knob)
        return self.epochs


@dataclass
class Batch:
    x_forget: Tensor
    y_forget: Tensor
    y_random: Tensor  # a label other than the true one, per forget sample
    x_retain: Tensor
    y_retain: Tensor


class Stepper(Protocol):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        """One update; returns detached device scalars to record."""


def forget_loss(kind: str, logits: Tensor, batch: Batch) -> Tensor:
    if kind == "random_label":
        return F.cross_entropy(logits, batch.y_random)
    if kind == "negative_ce":
        return -F.cross_entropy(logits, batch.y_forget)
    raise ValueError(f"forget loss must be one of {FORGET_LOSSES}, got {kind!r}")


def forward_pair(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Logits of the forget and retain batches from one forward pass."""
    logits = model(torch.cat([batch.x_forget, batch.x_retain]))
    n = batch.x_forget.shape[0]
    return logits[:n], logits[n:]


class ImplicitStepper:
    """EUPMU implicit surgery and FAMO: one backward pass through ``opt.combine``."""

    def __init__(self, model: nn.Module, opt: EUPMU, loss_kind: str, exact_dual: bool) -> None:
        self.model, self.opt, self.loss_kind, self.exact_dual = model, opt, loss_kind, exact_dual
        self.needs_forget_after = opt.dual_config.rule == "famo"

    def step(self, batch: Batch) -> dict[str, Tensor]:
        self.opt.zero_grad()
        logits_f, logits_r = forward_pair(self.model, batch)
        loss_f = forget_loss(self.loss_kind, logits_f, batch)
        loss_r = F.cross_entropy(logits_r, batch.y_retain)
        self.opt.combine(loss_f, loss_r).backward()
        self.opt.step()
        if self.exact_dual:
            with torch.no_grad():
                after_f, after_r = forward_pair(self.model, batch)
                retain_after = F.cross_entropy(after_r, batch.y_retain)
                forget_after = forget_loss(self.loss_kind, after_f, batch) if self.needs_forget_after else None
            self.opt.update_dual(retain_after, forget_after)
        record = {"forget_loss": loss_f.detach(), "retain_loss": loss_r.detach()}
        if self.opt.w is not None:
            record["w"] = self.opt.w.detach().clone()
        return record


class ExplicitStepper:
    """Two-gradient surgery (UNGrad, PCGrad, GradDiff): retain and forget backward passes."""

    def __init__(self, model: nn.Module, opt: EUPMU, loss_kind: str) -> None:
        self.model, self.opt, self.loss_kind = model, opt, loss_kind

    def step(self, batch: Batch) -> dict[str, Tensor]:
        self.opt.zero_grad()
        logits_f, logits_r = forward_pair(self.model, batch)
        loss_f = forget_loss(self.loss_kind, logits_f, batch)
        loss_r = F.cross_entropy(logits_r, batch.y_retain)
        loss_r.backward(retain_graph=True)
        self.opt.stash_retain_grad()
        loss_f.backward()
        self.opt.step()
        stats = self.opt.stats()
        return {"forget_loss": loss_f.detach(), "retain_loss": loss_r.detach(),
                "lambda": stats["lambda"].detach().clone(), "cos": stats["cos"].detach().clone()}


class PlainStepper:
    """One loss, one backward pass, ``torch.optim.SGD`` (GA, RL, FT)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, objective: Callable[[nn.Module, Batch], Tensor]):
        self.model, self.opt, self.objective = model, opt, objective

    def step(self, batch: Batch) -> dict[str, Tensor]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.objective(self.model, batch)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}


def _ga_objective(model: nn.Module, batch: Batch) -> Tensor:
    return -F.cross_entropy(model(batch.x_forget), batch.y_forget)


def _rl_objective(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(torch.cat([batch.x_forget, batch.x_retain]))
    return F.cross_entropy(logits, torch.cat([batch.y_random, batch.y_retain]))


def _ft_objective(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch.x_retain), batch.y_retain)


PLAIN_OBJECTIVES = {"ga": _ga_objective, "rl": _rl_objective, "ft": _ft_objective}


def make_stepper(spec: MethodSpec, hyper: Hyper, model: nn.Module, schedule: Schedule) -> Stepper:
    base = dict(lr=hyper.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    if spec.family == "plain":
        return PlainStepper(model, torch.optim.SGD(model.parameters(), **base), PLAIN_OBJECTIVES[spec.option])
    knobs = {**dict(spec.fixed), **_optimizer_knobs(spec, hyper)}
    if spec.family == "implicit":
        opt = EUPMU(model.named_parameters(), rule="sgd", mode="implicit", dual=spec.option, **base, **knobs)
        return ImplicitStepper(model, opt, spec.forget_loss or "random_label", schedule.exact_dual)
    opt = EUPMU(model.named_parameters(), rule="sgd", mode="explicit", surgery=spec.option, **base, **knobs)
    return ExplicitStepper(model, opt, spec.forget_loss or "random_label")


def _optimizer_knobs(spec: MethodSpec, hyper: Hyper) -> dict[str, float]:
    knobs = {} if hyper.tolerance is None else {"tolerance": hyper.tolerance}
    if hyper.knob is None or spec.knob in (None, "epochs"):
        return knobs
    if spec.knob == "err":  # the authors' err demands a retain improvement: tolerance = -err
        return {**knobs, "tolerance": -hyper.knob}
    return {**knobs, spec.knob: hyper.knob}


class IndexStream:
    """Endless mini-batches of indices, reshuffled at every pass over ``n`` samples.

    Indices are drawn on the generator's device, so batches never cross from host to device.
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
        if self._pos >= self.n:
            self._order = self._shuffle()
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


@dataclass
class UnlearnRun:
    model: nn.Module
    seconds: float
    steps: int
    per_step: dict[str, list[float]] = field(default_factory=dict)
    trace: dict[str, list[float]] = field(default_factory=dict)  # step, forget_acc, retain_acc


def total_steps(spec: MethodSpec, hyper: Hyper, scenario: Scenario, schedule: Schedule) -> int:
    return schedule.epochs_for(spec, hyper) * math.ceil(len(scenario.retain) / schedule.retain_batch)


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


def unlearn(spec: MethodSpec, hyper: Hyper, model: nn.Module, scenario: Scenario, num_classes: int,
            schedule: Schedule, seed: int, trace_points: int = 0, max_steps: int | None = None) -> UnlearnRun:
    """Run one method in place on ``model``; the scenario's tensors must be on the model's device."""
    device = next(model.parameters()).device
    steps = total_steps(spec, hyper, scenario, schedule)
    if max_steps is not None:
        steps = min(steps, max_steps)
    batch_gen = torch.Generator(device=device).manual_seed(seed)
    label_gen = torch.Generator(device=device).manual_seed(seed + 1)
    forget_idx = IndexStream(len(scenario.forget), schedule.forget_batch, batch_gen)
    retain_idx = IndexStream(len(scenario.retain), schedule.retain_batch, batch_gen)
    tracer = Tracer(scenario, steps, trace_points)
    model.train()
    stepper = make_stepper(spec, hyper, model, schedule)
    records: list[dict[str, Tensor]] = []
    tracer.maybe_record(0, model)  # before the clock starts: not part of the run time
    untimed = 0.0
    start = time.perf_counter()
    for step in range(steps):
        batch = _draw(scenario, forget_idx.next(), retain_idx.next(), num_classes, label_gen, device)
        records.append(stepper.step(batch))
        untimed += tracer.maybe_record(step + 1, model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start - untimed
    model.eval()
    return UnlearnRun(model, seconds, steps, _stack_records(records), tracer.values)


def _draw(scenario: Scenario, f_idx: Tensor, r_idx: Tensor, num_classes: int, gen: torch.Generator,
          device: torch.device) -> Batch:
    y_forget = scenario.forget.y[f_idx]
    shift = torch.randint(1, num_classes, y_forget.shape, generator=gen, device=device)
    return Batch(scenario.forget.x[f_idx], y_forget, (y_forget + shift) % num_classes,
                 scenario.retain.x[r_idx], scenario.retain.y[r_idx])


def _stack_records(records: list[dict[str, Tensor]]) -> dict[str, list[float]]:
    if not records:
        return {}
    return {key: torch.stack([r[key] for r in records]).float().cpu().tolist() for key in records[0]}
