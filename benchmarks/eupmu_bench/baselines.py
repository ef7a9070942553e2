"""Baseline steps written the way users write them without this library.

* naive surgery: what published unlearning code does. Both gradients are flattened with
  ``torch.cat`` into fresh vectors, the dot product is read back by the host (``if dot < 0``),
  the correction is computed on the flat vectors, the result is cut back into fresh ``.grad``
  tensors, optionally clipped with ``clip_grad_norm_``, and ``torch.optim.AdamW`` steps.
* composed torch: the best one can do with public torch ops and no host read: ``_foreach``
  norms and per-tensor dot products for the Gramian, lambda on the device, ``_foreach`` ops
  for the in-place combination, then ``AdamW(fused=True)``.
* fused AdamW on g_f alone: no surgery at all, the floor every surgery step is compared with.

Every prepare function returns a :class:`PreparedStep` whose ``step`` is exactly one
optimisation step on the workload's gradients; ``before`` (untimed) restores what a step
consumed so that every timed step does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .timing import StepFn
from .workloads import Workload


@dataclass(frozen=True)
class Settings:
    """Hyperparameters shared by every method, so all of them compute the same update."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_norm: float = 1.0
    state_dtype: torch.dtype | None = None  # our optimizer only; torch.optim keeps the param dtype


@dataclass
class PreparedStep:
    step: StepFn
    params: list[Tensor]
    state_dtype: torch.dtype
    before: StepFn | None = None
    keep_alive: list[Any] = field(default_factory=list)
    # Memory the benchmark itself allocated while preparing (its copy of the parameters, ...),
    # which a user's training loop would already hold: not charged to the method.
    harness_bytes: int = 0


def _adamw(params: list[Tensor], settings: Settings, *, fused: bool) -> torch.optim.AdamW:
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, **impl)


def install_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


# ---------------------------------------------------------------------------- plain AdamW


def prepare_fused_adamw(wl: Workload, backend: str | None, settings: Settings) -> PreparedStep:
    params = wl.fresh_params()
    install_grads(params, wl.grads_f)
    opt = _adamw(params, settings, fused=True)
    return PreparedStep(opt.step, params, wl.dtype, keep_alive=[opt], harness_bytes=wl.tensor_bytes)


# ---------------------------------------------------------------------------- naive surgery


def naive_surgery_direction(grads_f: Sequence[Tensor], grads_r: Sequence[Tensor]) -> Tensor:
    """Unilateral surgery (tolerance 0) on freshly flattened copies, as published code does it."""
    g_f = torch.cat([g.reshape(-1) for g in grads_f])
    g_r = torch.cat([g.reshape(-1) for g in grads_r])
    dot = torch.dot(g_f, g_r)
    if dot < 0:  # the host waits for the device here
        g_f = g_f - dot / torch.dot(g_r, g_r) * g_r
    return g_f


def unflatten_into_grads(flat: Tensor, params: Sequence[Tensor]) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def prepare_naive(wl: Workload, settings: Settings, *, clip: bool, fused: bool) -> PreparedStep:
    params = wl.fresh_params()
    opt = _adamw(params, settings, fused=fused)
    grads_r = wl.grads_r  # the retain gradients the user kept from the first backward pass

    def before() -> None:  # a fresh backward pass would leave g_f in .grad
        install_grads(params, wl.grads_f)

    def step() -> None:
        direction = naive_surgery_direction([p.grad for p in params], grads_r)
        unflatten_into_grads(direction, params)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, settings.max_norm)
        opt.step()

    before()
    return PreparedStep(step, params, wl.dtype, before=before, keep_alive=[opt], harness_bytes=wl.tensor_bytes)


# ---------------------------------------------------------------------------- composed torch


def composed_gramian(grads_f: Sequence[Tensor], grads_r: Sequence[Tensor]) -> Tensor:
    """float32 (<f,f>, <f,r>, <r,r>) from public torch ops, with no host read.

    torch has no ``_foreach`` dot product, so the cross term is one ``torch.dot`` per tensor.
    """
    ff = torch.stack(torch._foreach_norm(list(grads_f), 2, dtype=torch.float32)).square().sum()
    rr = torch.stack(torch._foreach_norm(list(grads_r), 2, dtype=torch.float32)).square().sum()
    fr = torch.stack([torch.dot(f.reshape(-1), r.reshape(-1)).float() for f, r in zip(grads_f, grads_r)]).sum()
    return torch.stack([ff, fr, rr])


def unilateral_lambda(gram: Tensor) -> Tensor:
    """lambda* = max(0, -<f,r> / <r,r>) (tolerance 0), 0 when g_r = 0; stays on the device."""
    fr, rr = gram[1], gram[2]
    safe_rr = torch.where(rr > 0, rr, torch.ones_like(rr))
    return torch.where(rr > 0, torch.clamp(-fr / safe_rr, min=0.0), torch.zeros_like(rr))


def composed_surgery_(grads_f: list[Tensor], grads_r: list[Tensor]) -> None:
    """g_f <- g_f + lambda* g_r in place, lambda* on the device (no host read)."""
    lam = unilateral_lambda(composed_gramian(grads_f, grads_r))
    torch._foreach_add_(grads_f, torch._foreach_mul(grads_r, lam.to(grads_f[0].dtype)))


def _prepare_surgery_then_adamw(wl: Workload, settings: Settings, surgery) -> PreparedStep:
    params = wl.fresh_params()
    grads_f = [g.clone() for g in wl.grads_f]  # combined in place, so the workload's stay intact
    grads_r = wl.grads_r
    opt = _adamw(params, settings, fused=True)

    def before() -> None:  # a fresh backward pass leaves g_f in .grad
        for p, g, g0 in zip(params, grads_f, wl.grads_f):
            g.copy_(g0)
            p.grad = g

    def step() -> None:
        surgery(grads_f, grads_r)
        opt.step()

    before()
    return PreparedStep(step, params, wl.dtype, before=before, keep_alive=[opt, grads_f],
                        harness_bytes=2 * wl.tensor_bytes)


def prepare_composed(wl: Workload, backend: str | None, settings: Settings) -> PreparedStep:
    return _prepare_surgery_then_adamw(wl, settings, composed_surgery_)


def prepare_composed_compiled(wl: Workload, backend: str | None, settings: Settings) -> PreparedStep:
    """The composed surgery under ``torch.compile`` (compiled during the untimed warm-up steps)."""
    return _prepare_surgery_then_adamw(wl, settings, torch.compile(composed_surgery_, dynamic=False))
