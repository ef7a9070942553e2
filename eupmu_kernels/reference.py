"""Float64 reference semantics (docs/design.md: Explicit surgery, Implicit surgery, Base update rules) on flat vectors.

Everything here is deliberately plain: one function per formula, no fusion, no in-place
tricks. Every fast path of the library is tested against these functions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

CLIP_EPS = 1e-6
LOG_OFFSET = 1e-8


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64).reshape(-1)


def gramian(g_f: Tensor, g_r: Tensor) -> Tensor:
    """(<g_f,g_f>, <g_f,g_r>, <g_r,g_r>) in float64."""
    a, b = _f64(g_f), _f64(g_r)
    return torch.stack([a @ a, a @ b, b @ b])


def ungrad_lambda(gram: Tensor, eps: float) -> float:
    """lambda* = max(0, (-<g_f,g_r> - eps) / <g_r,g_r>), 0 when g_r = 0."""
    _, ab, bb = (float(v) for v in gram)
    if bb == 0.0:
        return 0.0
    return max(0.0, (-ab - eps) / bb)


def pair_coefficients(gram: Tensor, method: str, eps: float = 0.0, alpha: float = 1.0) -> tuple[float, float]:
    """(a, b) such that d = a*g_f + b*g_r for every surgery rule (docs/design.md, Explicit surgery)."""
    aa, ab, bb = (float(v) for v in gram)
    if method == "none":  # the one-gradient case (implicit mode): d = g_f
        return 1.0, 0.0
    if method == "ungrad":
        return 1.0, ungrad_lambda(gram, eps)
    if method == "graddiff":
        return 1.0, alpha
    if method == "pcgrad":
        if ab >= 0.0:
            return 1.0, 1.0
        a = 1.0 - (ab / aa if aa > 0.0 else 0.0)
        b = 1.0 - (ab / bb if bb > 0.0 else 0.0)
        return a, b
    raise ValueError(f"unknown surgery method {method!r}")


def combined_norm(gram: Tensor, a: float, b: float) -> float:
    """||a*g_f + b*g_r|| from the Gramian alone."""
    aa, ab, bb = (float(v) for v in gram)
    return math.sqrt(max(0.0, a * a * aa + 2.0 * a * b * ab + b * b * bb))


def clip_factor(norm: float, max_norm: float | None) -> float:
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


def surgery(g_f: Tensor, g_r: Tensor, method: str = "ungrad", eps: float = 0.0, alpha: float = 1.0,
            max_norm: float | None = None) -> Tensor:
    """The combined direction d (clipped when max_norm is given), in float64."""
    gram = gramian(g_f, g_r)
    a, b = pair_coefficients(gram, method, eps, alpha)
    clip = clip_factor(combined_norm(gram, a, b), max_norm)
    return clip * (a * _f64(g_f) + b * _f64(g_r))


def ungrad(g_f: Tensor, g_r: Tensor, eps: float = 0.0) -> Tensor:
    return surgery(g_f, g_r, "ungrad", eps)


def pcgrad(g_f: Tensor, g_r: Tensor) -> Tensor:
    """PCGrad written out gradient by gradient, independently of pair_coefficients."""
    f, r = _f64(g_f), _f64(g_r)
    dot = f @ r
    if dot >= 0:
        return f + r
    f_proj = f - dot / (r @ r) * r if (r @ r) > 0 else f
    r_proj = r - dot / (f @ f) * f if (f @ f) > 0 else r
    return f_proj + r_proj


def graddiff(g_f: Tensor, g_r: Tensor, alpha: float = 1.0) -> Tensor:
    return _f64(g_f) + alpha * _f64(g_r)


# --- base update rules (torch.optim semantics, float64) -------------------------------------


@dataclass
class RuleState:
    step: int = 0
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    momentum_buffer: Tensor | None = None


def sgd_step(p: Tensor, d: Tensor, st: RuleState, lr: float, momentum: float = 0.0, dampening: float = 0.0,
             weight_decay: float = 0.0, nesterov: bool = False) -> Tensor:
    p, d = _f64(p), _f64(d)
    if weight_decay:
        d = d + weight_decay * p
    if momentum:
        if st.momentum_buffer is None:
            st.momentum_buffer = d.clone()
        else:
            st.momentum_buffer = momentum * st.momentum_buffer + (1.0 - dampening) * d
        d = d + momentum * st.momentum_buffer if nesterov else st.momentum_buffer
    st.step += 1
    return p - lr * d


def adam_step(p: Tensor, d: Tensor, st: RuleState, lr: float, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
              preconditioner_gradient: Tensor | None = None) -> Tensor:
    """torch.optim.Adam/AdamW. With ``preconditioner_gradient`` g0 (update-space surgery) the step's
    denominator comes from beta2*v + (1-beta2)*g0'^2 (g0' = g0 plus the L2 term) instead of the new
    second moment; the stored second moment is the usual one."""
    p, d = _f64(p), _f64(d)
    if st.exp_avg is None:
        st.exp_avg = torch.zeros_like(p)
        st.exp_avg_sq = torch.zeros_like(p)
    g0 = None if preconditioner_gradient is None else _f64(preconditioner_gradient)
    if weight_decay and not decoupled:
        d = d + weight_decay * p
        g0 = None if g0 is None else g0 + weight_decay * p
    v_before = st.exp_avg_sq
    if weight_decay and decoupled:
        p = p * (1.0 - lr * weight_decay)
    st.step += 1
    st.exp_avg = beta1 * st.exp_avg + (1.0 - beta1) * d
    st.exp_avg_sq = beta2 * v_before + (1.0 - beta2) * d * d
    bc1 = 1.0 - beta1**st.step
    bc2 = 1.0 - beta2**st.step
    second = st.exp_avg_sq if g0 is None else beta2 * v_before + (1.0 - beta2) * g0 * g0
    denom = second.sqrt() / math.sqrt(bc2) + eps
    return p - (lr / bc1) * st.exp_avg / denom


def adamw_step(p: Tensor, d: Tensor, st: RuleState, lr: float, beta1: float = 0.9, beta2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 1e-2, preconditioner_gradient: Tensor | None = None) -> Tensor:
    return adam_step(p, d, st, lr, beta1, beta2, eps, weight_decay, decoupled=True,
                     preconditioner_gradient=preconditioner_gradient)


def rule_step(rule: str, p: Tensor, d: Tensor, st: RuleState, preconditioner_gradient: Tensor | None = None,
              **hp) -> Tensor:
    if rule == "sgd":
        return sgd_step(p, d, st, **hp)
    hp["preconditioner_gradient"] = preconditioner_gradient
    if rule == "adam":
        return adam_step(p, d, st, **hp)
    if rule == "adamw":
        return adamw_step(p, d, st, **hp)
    raise ValueError(f"unknown rule {rule!r}")


# --- update-space surgery (docs/design.md, Update-space surgery) -----------------------------


def first_order_retain_change(rule: str, p: Tensor, g_f: Tensor, g_r: Tensor, st: RuleState, lam: float,
                              clip: float = 1.0, **hp) -> float:
    """<theta_{t+1} - theta_t, g_r> of the step the optimizer takes with d = clip*(g_f + lam*g_r)
    (update space: Adam's denominator from the uncorrected g_f), the state left untouched."""
    d = clip * (_f64(g_f) + lam * _f64(g_r))
    new = rule_step(rule, p, d, copy.deepcopy(st), preconditioner_gradient=g_f, **hp)
    return float((new - _f64(p)) @ _f64(g_r))


def update_space_lambda(rule: str, p: Tensor, g_f: Tensor, g_r: Tensor, st: RuleState, tolerance: float,
                        clip: float = 1.0, **hp) -> float:
    """The smallest lambda >= 0 whose step has <theta_{t+1} - theta_t, g_r> <= lr * tolerance.

    The change is affine in lambda for a fixed clip factor, so two steps (lambda = 0 and 1) give it;
    this is independent of the kernels' closed form in terms of dot products."""
    budget = hp["lr"] * tolerance
    at0 = first_order_retain_change(rule, p, g_f, g_r, st, 0.0, clip, **hp)
    at1 = first_order_retain_change(rule, p, g_f, g_r, st, 1.0, clip, **hp)
    slope = at0 - at1  # how much one unit of lambda lowers the change
    if slope <= 0.0:
        return 0.0
    return max(0.0, (at0 - budget) / slope)


# --- implicit surgery: dual rules (docs/design.md, Implicit surgery) --------------------------


def transform(loss: float, kind: str, lower_bound: float = 0.0) -> float:
    if kind == "identity":
        return loss
    shifted = loss - lower_bound + LOG_OFFSET
    if shifted <= 0:
        raise ValueError("log transform of a non-positive loss")
    return math.log(shifted)


def dual_delta(l_r_before: float, l_r_after: float, eps: float, scale: float = 1.0, phi: str = "identity",
               lower_bound: float = 0.0) -> float:
    """delta_t = (phi(L_r(theta_t)) - phi(L_r(theta_t+1))) / s_t + eps."""
    return (transform(l_r_before, phi, lower_bound) - transform(l_r_after, phi, lower_bound)) / scale + eps


def paper_dual_update(w: float, delta: float, beta: float) -> float:
    return max(0.0, w - beta * delta)


@dataclass
class AdamScalarState:
    step: int = 0
    m: float = 0.0
    v: float = 0.0


def adam_scalar_step(x: float, grad: float, st: AdamScalarState, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.0) -> float:
    """One torch.optim.Adam step (coupled weight decay) on a scalar, descending along grad."""
    grad = grad + weight_decay * x
    st.step += 1
    st.m = betas[0] * st.m + (1 - betas[0]) * grad
    st.v = betas[1] * st.v + (1 - betas[1]) * grad * grad
    bc1 = 1 - betas[0] ** st.step
    bc2 = 1 - betas[1] ** st.step
    return x - (lr / bc1) * st.m / (math.sqrt(st.v) / math.sqrt(bc2) + eps)


def reference_dual_update(w: float, l_r_before: float, l_r_after: float, err: float, beta: float,
                          st: AdamScalarState, weight_decay: float = 0.01, lower_bound: float = 0.0) -> float:
    """The authors' published rule: Adam descent on w along log L_r(t) - log L_r(t+1) - err, then w >= 0."""
    grad = transform(l_r_before, "log", lower_bound) - transform(l_r_after, "log", lower_bound) - err
    return max(0.0, adam_scalar_step(w, grad, st, beta, weight_decay=weight_decay))


# --- FAMO (docs/design.md, Implicit surgery) -------------------------------------------------


@dataclass
class FamoState:
    logits: list[float] = field(default_factory=lambda: [0.0, 0.0])
    adam: list[AdamScalarState] = field(default_factory=lambda: [AdamScalarState(), AdamScalarState()])


def famo_weights(st: FamoState) -> list[float]:
    m = max(st.logits)
    e = [math.exp(x - m) for x in st.logits]
    s = sum(e)
    return [x / s for x in e]


def famo_objective(losses: list[float], st: FamoState, lower_bounds=(0.0, 0.0)) -> float:
    z = famo_weights(st)
    dd = [loss - m + LOG_OFFSET for loss, m in zip(losses, lower_bounds)]
    c = sum(zi / di for zi, di in zip(z, dd))
    return sum(zi * math.log(di) for zi, di in zip(z, dd)) / c


def famo_update(st: FamoState, losses_before: list[float], losses_after: list[float], lr: float = 0.025,
                weight_decay: float = 1e-5, lower_bounds=(0.0, 0.0)) -> None:
    delta = [math.log(b - m + LOG_OFFSET) - math.log(a - m + LOG_OFFSET)
             for b, a, m in zip(losses_before, losses_after, lower_bounds)]
    z = famo_weights(st)
    # d/dxi_j of sum_i z_i delta_i = z_j (delta_j - sum_i z_i delta_i)
    mean = sum(zi * di for zi, di in zip(z, delta))
    grads = [zj * (dj - mean) for zj, dj in zip(z, delta)]
    st.logits = [adam_scalar_step(x, g, s, lr, weight_decay=weight_decay)
                 for x, g, s in zip(st.logits, grads, st.adam)]
