"""The torch backend: the kernel contract in plain torch ops.

Runs on any device and dtype, with float32 math for low-precision storage. It is the CPU path
when no compiled kernels are built and the fallback everywhere else; it favours clarity over
bandwidth (each state tensor is written through ``torch.where`` so a skipped step changes
nothing).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import coefficients as _coef
from .base import CA, CB, SKIP, RuleStateLists, StepHyper, SurgeryConfig


def _opmath(t: Tensor) -> Tensor:
    """float32 arithmetic for float32 and narrower storage; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return torch.dot(_opmath(x.reshape(-1)), _opmath(y.reshape(-1))).float()


class TorchBackend:
    name = "torch"

    def available(self) -> bool:
        return True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        device = a[0].device
        aa = [_dot(x, x) for x in a]
        if b is None:
            zero = torch.zeros((), dtype=torch.float32, device=device)
            return torch.stack([torch.stack(aa).sum(), zero, zero])
        ab = [_dot(x, y) for x, y in zip(a, b)]
        bb = [_dot(y, y) for y in b]
        return torch.stack([torch.stack(aa).sum(), torch.stack(ab).sum(), torch.stack(bb).sum()])

    def coefficients(self, gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None,
                     found_inf: Tensor | None) -> Tensor:
        return _coef.coefficients(gram, cfg, inv_scale, found_inf)

    def combine_(self, grads_f: Sequence[Tensor], grads_r: Sequence[Tensor] | None, coef: Tensor) -> None:
        keep = coef[SKIP] == 0
        ca, cb = coef[CA], coef[CB]
        for i, g in enumerate(grads_f):
            d = _direction(g, None if grads_r is None else grads_r[i], ca, cb)
            g.copy_(torch.where(keep, d, g))

    def step_(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
              grads_r: Sequence[Tensor] | None, state: RuleStateLists, coef: Tensor, hp: StepHyper) -> None:
        keep = coef[SKIP] == 0
        ca, cb = coef[CA], coef[CB]
        for i, p in enumerate(params):
            d = _direction(grads_f[i], None if grads_r is None else grads_r[i], ca, cb)
            step = state.step[i]
            if rule == "sgd":
                buf = state.momentum_buffer[i] if hp.momentum != 0 else None
                _sgd(p, d, buf, step, hp, keep)
            else:
                _adam(p, d, state.exp_avg[i], state.exp_avg_sq[i], step, hp, keep, decoupled=rule == "adamw")
            step.add_(keep.to(step.dtype))


def _direction(g_f: Tensor, g_r: Tensor | None, ca: Tensor, cb: Tensor) -> Tensor:
    d = _opmath(g_f) * ca
    if g_r is not None:
        d = d + _opmath(g_r) * cb
    return d


def _write(dst: Tensor, new: Tensor, keep: Tensor) -> None:
    dst.copy_(torch.where(keep, new.to(dst.dtype), dst))


def _sgd(p: Tensor, d: Tensor, buf: Tensor | None, step: Tensor, hp: StepHyper, keep: Tensor) -> None:
    p32 = _opmath(p)
    if hp.weight_decay != 0:
        d = d + hp.weight_decay * p32
    if buf is not None:
        first = step == 0
        new_buf = torch.where(first, d, _opmath(buf) * hp.momentum + (1.0 - hp.dampening) * d)
        _write(buf, new_buf, keep)
        d = d + hp.momentum * new_buf if hp.nesterov else new_buf
    _write(p, p32 - hp.lr * d, keep)


def _adam(p: Tensor, d: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, hp: StepHyper,
          keep: Tensor, decoupled: bool) -> None:
    p32 = _opmath(p)
    if hp.weight_decay != 0:
        if decoupled:
            p32 = p32 * (1.0 - hp.lr * hp.weight_decay)
        else:
            d = d + hp.weight_decay * p32
    t = step.double() + 1.0
    bc1 = (1.0 - torch.pow(hp.beta1, t)).to(p32.dtype)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(hp.beta2, t)).to(p32.dtype)
    m = torch.lerp(_opmath(exp_avg), d, 1.0 - hp.beta1)
    v = _opmath(exp_avg_sq) * hp.beta2 + (1.0 - hp.beta2) * d * d
    denom = v.sqrt() / bc2_sqrt + hp.eps
    new_p = p32 - (hp.lr / bc1) * (m / denom)
    _write(exp_avg, m, keep)
    _write(exp_avg_sq, v, keep)
    _write(p, new_p, keep)

