"""The coefficient stage in torch ops: the coefficient vector from the Gramian, on the device.

The torch backend's implementation, and the fallback of the other backends. A handful of tiny
ops on a 3-element tensor: no host reads, no branches on device values. The Gramian arrives in
float64 (docs/design.md, Kernel contract): the surgery rule's (a, b), the clip factor and the
unscale are computed in float64 and only the final vector is rounded to float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import (CLIP_EPS, CLIP_ITERATIONS, TERM_AA, TERM_AB, TERM_BB, TERM_K0, TERM_K1, TERM_K2,
                       SurgeryConfig)
from .surgery import get_surgery
from .surgery.base import safe_div


def unscaled(gram: Tensor, inv_scale: Tensor | None) -> Tensor:
    """The Gramian of the unscaled gradients (GradScaler multiplies every gradient by the scale)."""
    g = gram.to(torch.float64)
    if inv_scale is None:
        return g
    inv = inv_scale.to(device=g.device, dtype=torch.float64).reshape(())
    return g * (inv * inv)


def coefficients(gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None = None,
                 found_inf: Tensor | None = None) -> Tensor:
    """The float32 coefficient vector (``eupmu_kernels.contract``) from a (possibly scaled) Gramian."""
    g = unscaled(gram, inv_scale)
    inv = (torch.ones((), dtype=torch.float64, device=g.device) if inv_scale is None
           else inv_scale.to(device=g.device, dtype=torch.float64).reshape(()))
    aa, ab, bb = g[0], g[1], g[2]
    skip = ~torch.isfinite(g).all()
    if found_inf is not None:
        skip = skip | (found_inf.to(g.device).reshape(()) != 0)

    a, b = get_surgery(cfg.method).pair(aa, ab, bb, cfg)
    dnorm = torch.sqrt(torch.clamp(a * a * aa + 2.0 * a * b * ab + b * b * bb, min=0.0))
    if cfg.max_norm is None:
        clip = torch.ones_like(dnorm)
    else:
        clip = torch.clamp(cfg.max_norm / (dnorm + CLIP_EPS), max=1.0)
    return _vector(aa, ab, bb, a, b, dnorm, clip, inv, skip)


def _vector(aa: Tensor, ab: Tensor, bb: Tensor, a: Tensor, b: Tensor, dnorm: Tensor, clip: Tensor, inv: Tensor,
            skip: Tensor, round_cb_up: bool = False) -> Tensor:
    """Assemble the float32 vector; a step whose ca or cb does not fit in float32 is skipped too.

    ``round_cb_up``: cb is a lower bound (a constraint holds for any larger correction), so its
    float32 value is rounded up instead of to nearest."""
    cos = safe_div(ab, torch.sqrt(aa) * torch.sqrt(bb))
    ca, cb = a * clip * inv, b * clip * inv
    if round_cb_up:
        cb32 = cb.float()
        cb = torch.where(cb32.double() < cb, torch.nextafter(cb32, torch.full_like(cb32, float("inf"))), cb32)
        cb = cb.double()
    skip = skip | ~torch.isfinite(ca.float()) | ~torch.isfinite(cb.float())
    ca = torch.where(skip, torch.ones_like(a), ca)
    cb = torch.where(skip, torch.zeros_like(b), cb)
    return torch.stack([ca, cb, skip.to(torch.float64), b, clip, cos, dnorm, a]).to(torch.float32)


def update_space_coefficients(terms: Tensor, cfg: SurgeryConfig, budget: float,
                              found_inf: Tensor | None = None) -> Tensor:
    """UNGrad in update space (docs/design.md, Update-space surgery): the smallest lambda >= 0 with
    K0 + c*(K1 + lambda*K2) >= -budget, c the clip factor of d = g_f + lambda*g_r.

    ``terms``: float64[TERMS_LEN], the Gramian then (K0, K1, K2, T0). Without clipping the solution
    is closed-form; with clipping c depends on lambda, and a fixed number of fixed-point iterations
    (each a closed-form solve for the previous c) converges when the constraint is feasible. The
    gradients must be unscaled. The Triton kernel and ``csrc/eupmu_math.h`` follow this function
    operation for operation."""
    k = terms.to(torch.float64)
    aa, ab, bb = k[TERM_AA], k[TERM_AB], k[TERM_BB]
    k0, k1, k2 = k[TERM_K0], k[TERM_K1], k[TERM_K2]
    skip = ~torch.isfinite(k).all()
    if found_inf is not None:
        skip = skip | (found_inf.to(k.device).reshape(()) != 0)
    one = torch.ones_like(aa)

    def solve(c: Tensor) -> Tensor:
        return torch.clamp(safe_div(-budget - k0 - c * k1, c * k2), min=0.0)

    def norm_of(lam: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(aa + 2.0 * lam * ab + lam * lam * bb, min=0.0))

    lam, clip = solve(one), one
    if cfg.max_norm is not None:
        for _ in range(CLIP_ITERATIONS):
            clip = torch.clamp(cfg.max_norm / (norm_of(lam) + CLIP_EPS), max=1.0)
            lam = solve(clip)
        clip = torch.clamp(cfg.max_norm / (norm_of(lam) + CLIP_EPS), max=1.0)
    return _vector(aa, ab, bb, one, lam, norm_of(lam), clip, one, skip, round_cb_up=True)
