"""The coefficient vector (eupmu_kernels.contract layout) from the Gramian, in one single-program kernel.

The Gramian is float64 (docs/design.md, Kernel contract); a float32 one is widened first, which
is exact. All of the stage runs in float64: the scale factors, lambda, the clip factor and the
cosine, with the same zero-norm guards and the same nan propagation through the clamps as
``eupmu_kernels.coefficients``; only the eight final values are rounded to float32. The step is
skipped on a non-finite Gramian, on ``found_inf``, and when a coefficient the update kernels
multiply by (``ca``, ``cb``) does not fit in float32 (so a step can never write inf into the
parameters).

Host scalars (eps, alpha, max_norm) are float64 kernel arguments, so they reach the kernel
unrounded.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import COEF_LEN, SurgeryConfig, surgery_codes
from ..contract import CLIP_EPS
from ..surgery import SURGERY_RULES, SurgeryRule
from .common import DBL_MAX, FLT_MAX, aligned

METHOD_CODE = surgery_codes()


def _compiled_pair(rule: SurgeryRule) -> triton.JITFunction:
    """The rule unit's ``pair_triton`` as a Triton function: its module's ``tl`` is bound first."""
    sys.modules[rule.pair_triton.__module__].tl = tl
    return triton.jit(rule.pair_triton)


# One compiled formula per registered rule: the kernel takes it as a compile-time argument, so a
# rule added to the registry reaches this stage with no edit here (docs/design.md, Kernel contract).
PAIR_FNS = {name: _compiled_pair(rule) for name, rule in SURGERY_RULES.items()}


@triton.jit
def _safe_div(num, den):
    """num / den where den > 0, else 0, without evaluating a division by a non-positive number."""
    positive = den > 0.0
    return tl.where(positive, num / tl.where(positive, den, 1.0), 0.0)


@triton.jit
def _clamp_min0(x):
    """max(x, 0) that keeps nan, like torch.clamp."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _clamp_max1(x):
    """min(x, 1) that keeps nan, like torch.clamp."""
    return tl.where(x > 1.0, 1.0, x)


@triton.jit
def _coefficients_kernel(gram, inv_scale, found_inf, out, eps: tl.float64, alpha: tl.float64,
                         max_norm: tl.float64, PAIR: tl.constexpr, HAS_INV: tl.constexpr,
                         HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr, CLIP_EPS: tl.constexpr):
    aa = tl.load(gram)
    ab = tl.load(gram + 1)
    bb = tl.load(gram + 2)
    if HAS_INV:
        inv = tl.load(inv_scale).to(tl.float64)
        inv2 = inv * inv
        aa = aa * inv2
        ab = ab * inv2
        bb = bb * inv2
    else:
        inv = tl.full(aa.shape, 1.0, tl.float64)
    skip = ~((tl.abs(aa) <= DBL_MAX) & (tl.abs(ab) <= DBL_MAX) & (tl.abs(bb) <= DBL_MAX))
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf) != 0.0)

    a, b = PAIR(aa, ab, bb, eps, alpha)
    dnorm = tl.sqrt(_clamp_min0(a * a * aa + 2.0 * a * b * ab + b * b * bb))
    if HAS_CLIP:
        # tl.full makes the constant in float64 (a bare 1e-6 would be rounded to float32 first)
        clip = _clamp_max1(max_norm / (dnorm + tl.full(aa.shape, CLIP_EPS, tl.float64)))
    else:
        clip = tl.full(aa.shape, 1.0, tl.float64)
    cos = _safe_div(ab, tl.sqrt(aa) * tl.sqrt(bb))
    ca = a * clip * inv
    cb = b * clip * inv
    # the update kernels multiply in float32: a coefficient beyond its range cannot be applied
    skip = skip | ~((tl.abs(ca) <= FLT_MAX) & (tl.abs(cb) <= FLT_MAX))
    tl.store(out, tl.where(skip, 1.0, ca).to(tl.float32))
    tl.store(out + 1, tl.where(skip, 0.0, cb).to(tl.float32))
    tl.store(out + 2, tl.where(skip, 1.0, 0.0).to(tl.float32))
    tl.store(out + 3, b.to(tl.float32))
    tl.store(out + 4, clip.to(tl.float32))
    tl.store(out + 5, cos.to(tl.float32))
    tl.store(out + 6, dnorm.to(tl.float32))
    tl.store(out + 7, a.to(tl.float32))


def _scalar_f32(x: Tensor, device: torch.device) -> Tensor:
    return aligned(x.to(device=device, dtype=torch.float32).reshape(1))


def coefficients(gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
    """float32[COEF_LEN] on ``gram``'s device from a float64 (or float32) Gramian; see
    ``eupmu_kernels.contract``."""
    if cfg.method not in METHOD_CODE:
        raise ValueError(f"unknown surgery method {cfg.method!r}")
    device = gram.device
    gram = aligned(gram.to(torch.float64).contiguous())
    out = torch.empty(COEF_LEN, dtype=torch.float32, device=device)
    inv = gram if inv_scale is None else _scalar_f32(inv_scale, device)
    inf = gram if found_inf is None else _scalar_f32(found_inf, device)
    max_norm = 1.0 if cfg.max_norm is None else float(cfg.max_norm)
    _coefficients_kernel[(1,)](
        gram, inv, inf, out, float(cfg.eps), float(cfg.alpha), max_norm,
        PAIR=PAIR_FNS[cfg.method], HAS_INV=inv_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=cfg.max_norm is not None, CLIP_EPS=CLIP_EPS, num_warps=1)
    return out
