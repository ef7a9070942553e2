"""The coefficient vector (backends.base layout) from the Gramian, in one single-program kernel.

Mirrors ``eupmu_kernels.coefficients`` operation by operation (same zero-norm guards, the same
nan propagation through the clamps, unscale by ``inv_scale``, skip on a non-finite Gramian or
``found_inf``), so both paths agree to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.base import COEF_LEN, METHOD_CODE, SurgeryConfig
from ..reference import CLIP_EPS
from .common import FLT_MAX

UNGRAD: tl.constexpr = tl.constexpr(METHOD_CODE["ungrad"])
PCGRAD: tl.constexpr = tl.constexpr(METHOD_CODE["pcgrad"])
GRADDIFF: tl.constexpr = tl.constexpr(METHOD_CODE["graddiff"])


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
def _pair(aa, ab, bb, eps, alpha, METHOD: tl.constexpr):
    """(a, b) of the rule: d = a*g_f + b*g_r before clipping (METHOD picks one branch at compile time)."""
    if METHOD == UNGRAD:
        a = 1.0
        b = _clamp_min0(_safe_div(-ab - eps, bb))
    elif METHOD == PCGRAD:
        conflict = ab < 0.0
        a = tl.where(conflict, 1.0 - _safe_div(ab, aa), 1.0)
        b = tl.where(conflict, 1.0 - _safe_div(ab, bb), 1.0)
    elif METHOD == GRADDIFF:
        a = 1.0
        b = alpha
    else:
        a = 1.0
        b = 0.0
    return a, b


@triton.jit
def _coefficients_kernel(gram, inv_scale, found_inf, out, eps, alpha, max_norm,
                         METHOD: tl.constexpr, HAS_INV: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                         HAS_CLIP: tl.constexpr, CLIP_EPS: tl.constexpr):
    aa = tl.load(gram)
    ab = tl.load(gram + 1)
    bb = tl.load(gram + 2)
    if HAS_INV:
        inv = tl.load(inv_scale)
        inv2 = inv * inv
        aa = aa * inv2
        ab = ab * inv2
        bb = bb * inv2
    skip = ~((tl.abs(aa) <= FLT_MAX) & (tl.abs(ab) <= FLT_MAX) & (tl.abs(bb) <= FLT_MAX))
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf) != 0.0)

    a, b = _pair(aa, ab, bb, eps, alpha, METHOD)
    dnorm = tl.sqrt_rn(_clamp_min0(a * a * aa + 2.0 * a * b * ab + b * b * bb))
    if HAS_CLIP:
        clip = _clamp_max1(max_norm / (dnorm + CLIP_EPS))
    else:
        clip = 1.0
    cos = _safe_div(ab, tl.sqrt_rn(aa) * tl.sqrt_rn(bb))
    ca = a * clip
    cb = b * clip
    if HAS_INV:
        ca = ca * inv
        cb = cb * inv
    tl.store(out, tl.where(skip, 1.0, ca))
    tl.store(out + 1, tl.where(skip, 0.0, cb))
    tl.store(out + 2, tl.where(skip, 1.0, 0.0))
    tl.store(out + 3, b)
    tl.store(out + 4, clip)
    tl.store(out + 5, cos)
    tl.store(out + 6, dnorm)
    tl.store(out + 7, a)


def _scalar_f32(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device=device, dtype=torch.float32).reshape(1)


def coefficients(gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
    """float32[COEF_LEN] on ``gram``'s device; see ``eupmu_kernels.backends.base``."""
    if cfg.method not in METHOD_CODE:
        raise ValueError(f"unknown surgery method {cfg.method!r}")
    device = gram.device
    gram = gram.to(torch.float32).contiguous()
    out = torch.empty(COEF_LEN, dtype=torch.float32, device=device)
    inv = gram if inv_scale is None else _scalar_f32(inv_scale, device)
    inf = gram if found_inf is None else _scalar_f32(found_inf, device)
    max_norm = 1.0 if cfg.max_norm is None else float(cfg.max_norm)
    _coefficients_kernel[(1,)](
        gram, inv, inf, out, float(cfg.eps), float(cfg.alpha), max_norm,
        METHOD=METHOD_CODE[cfg.method], HAS_INV=inv_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=cfg.max_norm is not None, CLIP_EPS=CLIP_EPS, num_warps=1)
    return out
