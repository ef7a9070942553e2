"""Surgery coefficients from the Gramian, computed on the device with torch ops.

The torch backend's coefficient stage, and the fallback of the other backends. A handful of tiny
ops on a 3-element tensor: no host reads, no branches on device values. The Gramian arrives in
float64 (docs/design.md, Kernel contract: any finite float32 gradient has a finite, non-zero
float64 Gramian), the coefficients are computed in float64 and only the final vector is rounded
to float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends.base import SurgeryConfig

CLIP_EPS = 1e-6


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (without producing inf/nan in the selected branch)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def pair_coefficients(aa: Tensor, ab: Tensor, bb: Tensor, cfg: SurgeryConfig) -> tuple[Tensor, Tensor]:
    one = torch.ones_like(aa)
    if cfg.method == "ungrad":
        lam = torch.clamp(_safe_div(-ab - cfg.eps, bb), min=0.0)
        return one, lam
    if cfg.method == "graddiff":
        return one, torch.full_like(aa, cfg.alpha)
    if cfg.method == "pcgrad":
        conflict = ab < 0
        a = torch.where(conflict, 1.0 - _safe_div(ab, aa), one)
        b = torch.where(conflict, 1.0 - _safe_div(ab, bb), one)
        return a, b
    if cfg.method == "none":
        return one, torch.zeros_like(aa)
    raise ValueError(f"unknown surgery method {cfg.method!r}")


def unscaled(gram: Tensor, inv_scale: Tensor | None) -> Tensor:
    """The Gramian of the unscaled gradients (GradScaler multiplies every gradient by the scale)."""
    g = gram.to(torch.float64)
    if inv_scale is None:
        return g
    inv = inv_scale.to(device=g.device, dtype=torch.float64).reshape(())
    return g * (inv * inv)


def coefficients(gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None = None,
                 found_inf: Tensor | None = None) -> Tensor:
    """The float32[8] coefficient vector of backends.base from a (possibly scaled) Gramian."""
    g = unscaled(gram, inv_scale)
    inv = (torch.ones((), dtype=torch.float64, device=g.device) if inv_scale is None
           else inv_scale.to(device=g.device, dtype=torch.float64).reshape(()))
    aa, ab, bb = g[0], g[1], g[2]
    skip = ~torch.isfinite(g).all()
    if found_inf is not None:
        skip = skip | (found_inf.to(g.device).reshape(()) != 0)

    a, b = pair_coefficients(aa, ab, bb, cfg)
    dnorm = torch.sqrt(torch.clamp(a * a * aa + 2.0 * a * b * ab + b * b * bb, min=0.0))
    if cfg.max_norm is None:
        clip = torch.ones_like(dnorm)
    else:
        clip = torch.clamp(cfg.max_norm / (dnorm + CLIP_EPS), max=1.0)
    cos = _safe_div(ab, torch.sqrt(aa) * torch.sqrt(bb))
    ca = torch.where(skip, torch.ones_like(a), a * clip * inv)
    cb = torch.where(skip, torch.zeros_like(b), b * clip * inv)
    return torch.stack([ca, cb, skip.to(torch.float64), b, clip, cos, dnorm, a]).to(torch.float32)
