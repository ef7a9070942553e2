"""One unlearning step loop for every application (docs/design.md, Applications).

A step takes one (forget, retain) batch pair and updates the model in place; the method's family
(:mod:`eupmu_unlearn.methods`) decides how:

- explicit: the retain loss is backpropagated into the optimizer's retain buffer
  (``opt.retain_grad()``), the forget loss into ``.grad``; ``opt.step()`` does the surgery and
  the update (:func:`explicit_backward`);
- implicit: one backward pass of ``J = opt.combine(forget, retain)``, ``opt.step()``, then the
  exact dual update from the losses after the step (a no-grad forward), or none, and the next
  step's ``combine`` uses its retain loss as the lagged one (:func:`implicit_backward`);
- plain: one loss (the method's objective), one backward pass, a ``torch.optim`` step; a
  :class:`PlainExtras` adds what SalUn and l1-sparse put around it (a weight mask, a decaying l1
  penalty).

An application supplies an :class:`Objective`, which computes the losses of its batch pairs. The
Hugging Face integration (:mod:`eupmu_unlearn.hf`) runs :func:`explicit_backward` and
:func:`implicit_backward` inside ``Trainer.training_step``, where the Trainer owns the rest of
the loop (accumulation, the optimizer step, the exact dual update after it).

No step reads a device value back to the host: the records are device scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from eupmu_kernels import EUPMU

from .methods import Method

Backward = Callable[..., None]  # backward(loss, retain_graph=...) : loss.backward or the Trainer's


class Losses:
    """The forget and the retain loss of one batch pair, each computed when it is first read.

    ``shared_graph``: both come from one forward pass, so the first backward pass must keep
    the graph for the second.
    """

    def __init__(self, forget: Callable[[], Tensor], retain: Callable[[], Tensor], shared_graph: bool = False) -> None:
        self._forget, self._retain, self.shared_graph = forget, retain, shared_graph

    @cached_property
    def forget(self) -> Tensor:
        return self._forget()

    @cached_property
    def retain(self) -> Tensor:
        return self._retain()


class Objective:
    """How an application computes the losses of one of its batch pairs on a model.

    :meth:`losses` defaults to two separate forward passes, each run when its loss is needed.
    """

    def forget_loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    def retain_loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    def relabel_loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise ValueError(f"{type(self).__name__} has no class labels to randomise (method rl)")

    def losses(self, model: nn.Module, batch: Any) -> Losses:
        return Losses(lambda: self.forget_loss(model, batch), lambda: self.retain_loss(model, batch))

    def plain_loss(self, objective: str, model: nn.Module, batch: Any) -> Tensor:
        """The loss of a plain method's objective: "forget", "retain" or "relabel"."""
        return {"forget": self.forget_loss, "retain": self.retain_loss,
                "relabel": self.relabel_loss}[objective](model, batch)


@dataclass(frozen=True)
class BaseRule:
    """The base update rule that every method of a run shares."""

    rule: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    backend: str | None = None  # EUPMU's kernel backend (None: EUPMU_BACKEND or auto)

    def eupmu_arguments(self) -> dict[str, Any]:
        extra = {"momentum": self.momentum} if self.rule == "sgd" else {}
        return dict(rule=self.rule, lr=self.lr, weight_decay=self.weight_decay, backend=self.backend, **extra)

    def torch_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        if self.rule == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.rule == "adamw":  # fused where torch has the kernel: the fastest torch.optim step
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        raise ValueError(f"base rule must be sgd or adamw, got {self.rule!r}")


def build_optimizer(method: Method, model: nn.Module, base: BaseRule, options: dict[str, Any]) -> torch.optim.Optimizer:
    """EUPMU in the method's mode with ``options`` (its tuned knobs), or torch.optim for plain methods."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if method.family == "plain":
        return base.torch_optimizer([p for _, p in named])
    if method.family == "implicit":
        variant = {"dual": method.option}
    else:
        variant = {"surgery": method.option}
        if method.surgery_space != "gradient":
            variant["surgery_space"] = method.surgery_space
    return EUPMU(named, mode=method.family, **variant, **base.eupmu_arguments(), **options)


@dataclass
class PlainExtras:
    """What SalUn and l1-sparse add to a plain step (docs/design.md, Applications).

    ``mask``: one 0/1 tensor per trainable parameter (SalUn); only the masked weights move. The
    optimizer then has no weight decay of its own: ``masked_weight_decay`` is added to the
    gradient before the mask, so unmasked weights neither decay nor gather momentum.
    ``l1``: the initial coefficient of an l1 penalty on all trainable weights (l1-sparse); it
    decays linearly to 0 over ``steps`` steps, ``l1 * (1 - (k - 1) / steps)`` at step k.
    """

    mask: list[Tensor] | None = None
    masked_weight_decay: float = 0.0
    l1: float = 0.0
    steps: int = 1

    def l1_at(self, step: int) -> float:
        """The l1 coefficient at ``step`` (1-based): linear from ``l1`` at step 1 to 0 after ``steps``."""
        return self.l1 * max(0.0, 1.0 - (step - 1) / max(1, self.steps))


def saliency_mask(params: list[Tensor], keep: float) -> list[Tensor]:
    """0/1 masks that keep the ``keep`` share of the weights with the largest ``|.grad|`` (one
    global ranking over all parameters; exactly round(keep * n) weights, ties broken by index)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    magnitude = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().abs().reshape(-1)
                           for p in params])
    chosen = max(1, round(keep * magnitude.numel()))
    flat = torch.zeros_like(magnitude)
    flat[torch.topk(magnitude, chosen, sorted=False).indices] = 1.0
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]), params)]


def _backward(loss: Tensor, **kwargs: Any) -> None:
    loss.backward(**kwargs)


def explicit_backward(opt: EUPMU, losses: Losses, backward: Backward = _backward) -> None:
    """Retain loss into the retain buffer, then forget loss into ``.grad`` (one graph alive at a
    time unless both losses share one)."""
    with opt.retain_grad():
        backward(losses.retain, retain_graph=losses.shared_graph)
    backward(losses.forget)


def implicit_backward(opt: EUPMU, losses: Losses, backward: Backward = _backward) -> Tensor:
    """One backward pass of J = combine(forget, retain); returns J."""
    objective = opt.combine(losses.forget, losses.retain)
    backward(objective)
    return objective


class Stepper:
    """One step of ``method`` on ``model``: :meth:`step` returns the step's device scalars."""

    def __init__(self, method: Method, model: nn.Module, opt: torch.optim.Optimizer, objective: Objective,
                 exact_dual: bool, extras: PlainExtras | None = None) -> None:
        self.method, self.model, self.opt, self.objective, self.exact_dual = method, model, opt, objective, exact_dual
        self.extras = extras or PlainExtras()
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._count = 0

    def step(self, batch: Any) -> dict[str, Tensor]:
        self.opt.zero_grad()
        return {"implicit": self._implicit, "explicit": self._explicit, "plain": self._plain}[self.method.family](batch)

    def _explicit(self, batch: Any) -> dict[str, Tensor]:
        losses = self.objective.losses(self.model, batch)
        explicit_backward(self.opt, losses)
        self.opt.step()
        stats = self.opt.stats()
        return {**_loss_record(losses), **{key: stats[key].detach().clone() for key in ("lambda", "cos")}}

    def _implicit(self, batch: Any) -> dict[str, Tensor]:
        losses = self.objective.losses(self.model, batch)
        implicit_backward(self.opt, losses)
        self.opt.step()
        if self.exact_dual:
            self._exact_dual_update(batch)
        record = _loss_record(losses)
        if self.opt.w is not None:
            record["w"] = self.opt.w.detach().clone()
        return record

    def _exact_dual_update(self, batch: Any) -> None:
        """The losses at the new parameters on the same batch (FAMO needs the forget loss too)."""
        with torch.no_grad():
            after = self.objective.losses(self.model, batch)
            retain_after = after.retain
            forget_after = after.forget if self.opt.dual_config.rule == "famo" else None
        self.opt.update_dual(retain_after, forget_after)

    def _plain(self, batch: Any) -> dict[str, Tensor]:
        extras = self.extras
        self._count += 1
        loss = self.objective.plain_loss(self.method.option, self.model, batch)
        record = {f"{self.method.option}_loss": loss.detach()}
        if extras.l1 > 0:
            loss = loss + extras.l1_at(self._count) * torch.stack([p.abs().sum() for p in self._params]).sum()
        loss.backward()
        if extras.mask is not None:
            with torch.no_grad():
                for p, m in zip(self._params, extras.mask):
                    if p.grad is not None:
                        p.grad.add_(p, alpha=extras.masked_weight_decay).mul_(m)
        self.opt.step()
        return record


def _loss_record(losses: Losses) -> dict[str, Tensor]:
    return {"forget_loss": losses.forget.detach(), "retain_loss": losses.retain.detach()}


def run_steps(stepper: Stepper, draw: Callable[[], Any], steps: int,
              after_step: Callable[[int], None] | None = None) -> list[dict[str, Tensor]]:
    """``steps`` steps on batches from ``draw()``; ``after_step(k)`` runs after step k (1-based)."""
    records = []
    for k in range(1, steps + 1):
        records.append(stepper.step(draw()))
        if after_step is not None:
            after_step(k)
    return records


def stack_records(records: Iterable[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Per-step values, read from the device once."""
    records = list(records)
    if not records:
        return {}
    return {key: torch.stack([r[key] for r in records]).float().cpu().tolist() for key in records[0]}
