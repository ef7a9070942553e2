"""The coefficient stage in torch ops: the coefficient vector from the Gramian, on the device.

The torch backend's implementation, and the fallback of the other backends. A handful of tiny
ops on a 3-element tensor: no host reads, no branches on device values. The Gramian arrives in
float64 (docs/design.md, Kernel contract): the surgery rule's (a, b), the clip factor and the
unscale are computed in float64 and only the final vector is rounded to float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import CLIP_EPS, SurgeryConfig
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
    cos = safe_div(ab, torch.sqrt(aa) * torch.sqrt(bb))
    ca = torch.where(skip, torch.ones_like(a), a * clip * inv)
    cb = torch.where(skip, torch.zeros_like(b), b * clip * inv)
    return torch.stack([ca, cb, skip.to(torch.float64), b, clip, cos, dnorm, a]).to(torch.float32)
