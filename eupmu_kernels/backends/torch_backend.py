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
from ..contract import CA, CB, SKIP, TERMS_LEN, RuleStateLists, StepHyper, SurgeryConfig
from ..reductions import fixed_order_sum, sum_rows


def _opmath(t: Tensor) -> Tensor:
    """float32 arithmetic for float32 and narrower storage; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


# The Gramian is accumulated in float64 (any finite float32 gradient then has a finite Gramian), per
# tensor in fixed-size pieces, each summed in a fixed order (eupmu_kernels.reductions); the per-tensor
# totals are then summed the same way as the slots filled during the backward pass, so both paths
# give the same bits.
_PIECE = 1 << 22  # elements upcast at a time: bounds the float64 temporaries to 32 MiB each


def _tensor_gramian(a: Tensor, b: Tensor | None) -> Tensor:
    """float64[3] (<a,a>, <a,b>, <b,b>) of one tensor pair ((<a,a>, 0, 0) without b)."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    pieces = []
    for start in range(0, a.numel(), _PIECE):
        x = a[start:start + _PIECE].to(torch.float64)
        if b is None:
            sums = [fixed_order_sum(x * x)]
            zero = torch.zeros_like(sums[0])
            sums += [zero, zero]
        else:
            y = b[start:start + _PIECE].to(torch.float64)
            sums = [fixed_order_sum(x * x), fixed_order_sum(x * y), fixed_order_sum(y * y)]
        pieces.append(torch.stack(sums))
    if not pieces:
        return torch.zeros(3, dtype=torch.float64, device=a.device)
    return pieces[0] if len(pieces) == 1 else sum_rows(torch.stack(pieces))


def _gramian64(a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
    rows = [_tensor_gramian(x, None if b is None else b[i]) for i, x in enumerate(a)]
    return sum_rows(torch.stack(rows))


class TorchBackend:
    name = "torch"
    def available(self) -> bool:
        return True

    def supports_update_space(self, device: torch.device) -> bool:
        """update_terms, update_space_coefficients and the uncorrected-preconditioner Adam step."""
        return True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        return _gramian64(list(a), None if b is None else list(b))

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
        if _torch_fused_applies(rule, params, state, hp) and not hp.uncorrected_preconditioner:
            _torch_fused_step(rule, params, grads_f, grads_r, state, coef, hp)
            return
        keep = coef[SKIP] == 0
        ca, cb = coef[CA], coef[CB]
        for i, p in enumerate(params):
            d = _direction(grads_f[i], None if grads_r is None else grads_r[i], ca, cb)
            step = state.step[i]
            if rule == "sgd":
                buf = state.momentum_buffer[i] if hp.momentum != 0 else None
                _sgd(p, d, buf, step, hp, keep)
            else:
                g0 = _opmath(grads_f[i]) if hp.uncorrected_preconditioner else None
                _adam(p, d, state.exp_avg[i], state.exp_avg_sq[i], step, hp, keep, decoupled=rule == "adamw", g0=g0)
            step.add_(keep.to(step.dtype))


    def update_terms(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
                     grads_r: Sequence[Tensor], state: RuleStateLists, hp: StepHyper) -> Tensor:
        terms = _sgd_terms if rule == "sgd" else _adam_terms
        rows = [terms(rule, params[i], grads_f[i], grads_r[i], state, i, hp) for i in range(len(params))]
        if not rows:
            return torch.zeros(TERMS_LEN, dtype=torch.float64)
        return sum_rows(torch.stack(rows))

    def update_space_coefficients(self, terms: Tensor, cfg: SurgeryConfig, budget: float,
                                  found_inf: Tensor | None) -> Tensor:
        return _coef.update_space_coefficients(terms, cfg, budget, found_inf)


def _f64(t: Tensor) -> Tensor:
    return t.reshape(-1).to(torch.float64)


def _dot64(x: Tensor, y: Tensor) -> Tensor:
    return fixed_order_sum(x * y)


def _sgd_terms(rule: str, p: Tensor, g_f: Tensor, g_r: Tensor, state: RuleStateLists, i: int,
               hp: StepHyper) -> Tensor:
    """D = s_b*mu*b + s_d*(d + wd*theta) with d the combined direction: the Gramian and (K0, K1, K2,
    T0) of one tensor."""
    theta, f, r = _f64(p), _f64(g_f), _f64(g_r)
    first = state.step[i] == 0
    one = torch.ones((), dtype=torch.float64, device=p.device)
    zero = torch.zeros_like(one)
    mu = hp.momentum
    # float64 branches: torch.where of two Python floats would make a float32 tensor
    if mu == 0:
        s_b, s_d = zero, one
    elif hp.nesterov:  # D = (1 + mu) d_total + mu^2 b
        s_b, s_d = torch.where(first, zero, one * mu), (1.0 + mu) * one
    else:  # D = mu b + (1 - dampening) d_total, the first step D = d_total
        s_b, s_d = torch.where(first, zero, one), torch.where(first, one, one * (1.0 - hp.dampening))
    theta_r = _dot64(theta, r)
    buf_r = _dot64(_f64(state.momentum_buffer[i]), r) if mu != 0 else 0.0 * one
    ff, fr, rr = _dot64(f, f), _dot64(f, r), _dot64(r, r)
    k0 = hp.lr * (s_b * mu * buf_r + s_d * hp.weight_decay * theta_r)
    return torch.stack([ff, fr, rr, k0, hp.lr * s_d * fr, hp.lr * s_d * rr, theta_r])


def _adam_terms(rule: str, p: Tensor, g_f: Tensor, g_r: Tensor, state: RuleStateLists, i: int,
                hp: StepHyper) -> Tensor:
    """D = wd_dec*theta + P (beta1 m + (1 - beta1)(d + wd_l2*theta)) / bc1, P from the uncorrected g_f:
    the Gramian and (K0, K1, K2, T0) of one tensor."""
    theta, f, r = _f64(p), _f64(g_f), _f64(g_r)
    decoupled = rule == "adamw"
    l2 = 0.0 if decoupled else hp.weight_decay
    t = state.step[i].to(torch.float64) + 1.0
    bc1 = 1.0 - torch.pow(hp.beta1, t)
    bc2 = 1.0 - torch.pow(hp.beta2, t)
    g0 = f + l2 * theta
    v_bar = hp.beta2 * _f64(state.exp_avg_sq[i]) + (1.0 - hp.beta2) * g0 * g0
    pr = r / ((v_bar / bc2).sqrt() + hp.eps)  # P g_r
    theta_r = _dot64(theta, r)
    k0 = (hp.weight_decay * theta_r if decoupled else 0.0 * theta_r) \
        + (hp.beta1 * _dot64(_f64(state.exp_avg[i]), pr) + (1.0 - hp.beta1) * l2 * _dot64(theta, pr)) / bc1
    scale = (1.0 - hp.beta1) / bc1
    return torch.stack([_dot64(f, f), _dot64(f, r), _dot64(r, r), hp.lr * k0, hp.lr * scale * _dot64(f, pr),
                        hp.lr * scale * _dot64(r, pr), theta_r])


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
          keep: Tensor, decoupled: bool, g0: Tensor | None = None) -> None:
    """One Adam/AdamW step; with g0 (update-space surgery) the denominator is that of the uncorrected
    gradient g0, beta2*v + (1-beta2)*g0'^2, while the stored second moment is the usual one."""
    p32 = _opmath(p)
    if hp.weight_decay != 0:
        if decoupled:
            p32 = p32 * (1.0 - hp.lr * hp.weight_decay)
        else:
            d = d + hp.weight_decay * p32
            g0 = None if g0 is None else g0 + hp.weight_decay * _opmath(p)
    t = step.double() + 1.0
    bc1 = (1.0 - torch.pow(hp.beta1, t)).to(p32.dtype)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(hp.beta2, t)).to(p32.dtype)
    m = torch.lerp(_opmath(exp_avg), d, 1.0 - hp.beta1)
    v_before = _opmath(exp_avg_sq) * hp.beta2
    v = v_before + (1.0 - hp.beta2) * d * d
    second = v if g0 is None else v_before + (1.0 - hp.beta2) * g0 * g0
    denom = second.sqrt() / bc2_sqrt + hp.eps
    new_p = p32 - (hp.lr / bc1) * (m / denom)
    _write(exp_avg, m, keep)
    _write(exp_avg_sq, v, keep)
    _write(p, new_p, keep)



# --- fast path: torch's own fused optimizer kernels --------------------------------------------
# For float32/float64 storage with state of the same dtype, d is formed chunk by chunk with
# foreach ops and handed to torch._fused_{sgd,adam,adamw}_, which skip on the device through
# their found_inf argument. Chunks bound the temporary memory of d.

_FUSED_DTYPES = (torch.float32, torch.float64)
_CHUNK_NUMEL = 1 << 22


def _torch_fused_applies(rule: str, params: Sequence[Tensor], state: RuleStateLists, hp: StepHyper) -> bool:
    if rule == "sgd" and (hp.dampening != 0 or not hasattr(torch, "_fused_sgd_")):
        return False  # a zero-initialised buffer reproduces torch's first step only without dampening
    if rule != "sgd" and not hasattr(torch, "_fused_adam_"):
        return False
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _FUSED_DTYPES or device.type not in ("cpu", "cuda"):
        return False
    states = state.momentum_buffer if rule == "sgd" else state.exp_avg + state.exp_avg_sq
    return all(t.dtype == dtype and t.device == device for t in list(params) + states)


def _chunks(numels: list[int]) -> list[slice]:
    out, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if total and total + n > _CHUNK_NUMEL:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    out.append(slice(start, len(numels)))
    return out


def _torch_fused_step(rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
                      grads_r: Sequence[Tensor] | None, state: RuleStateLists, coef: Tensor, hp: StepHyper) -> None:
    skip = coef[SKIP]
    ca, cb = coef[CA], coef[CB]
    params = list(params)
    for part in _chunks([p.numel() for p in params]):
        d = torch._foreach_mul(list(grads_f[part]), ca)
        if grads_r is not None:
            torch._foreach_add_(d, torch._foreach_mul(list(grads_r[part]), cb))
        steps = state.step[part]
        torch._foreach_add_(steps, 1.0)  # the fused kernels read the already advanced step
        if rule == "sgd":
            bufs = state.momentum_buffer[part] if hp.momentum != 0 else []
            torch._fused_sgd_(params[part], d, bufs, weight_decay=hp.weight_decay, momentum=hp.momentum,
                              lr=hp.lr, dampening=hp.dampening, nesterov=hp.nesterov, maximize=False,
                              is_first_step=False, grad_scale=None, found_inf=skip)
        else:
            fused = torch._fused_adamw_ if rule == "adamw" else torch._fused_adam_
            fused(params[part], d, state.exp_avg[part], state.exp_avg_sq[part], [], steps, lr=hp.lr,
                  beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps, amsgrad=False,
                  maximize=False, grad_scale=None, found_inf=skip)
        torch._foreach_sub_(steps, [skip] * len(steps))
