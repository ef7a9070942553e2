"""UNGrad, unilateral surgery: d = g_f + lambda* g_r, lambda* = max(0, (-<g_f,g_r> - tol) / <g_r,g_r>).

The forget gradient is corrected only when it conflicts with the retain gradient, and then just
enough that <d, g_r> >= -tol; g_r itself is never changed. lambda* = 0 when g_r = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SurgeryConfig
from .base import SurgeryRule, safe_div

tl = None  # bound by the Triton backend before it compiles pair_triton


def pair(aa: Tensor, ab: Tensor, bb: Tensor, cfg: SurgeryConfig) -> tuple[Tensor, Tensor]:
    return torch.ones_like(aa), torch.clamp(safe_div(-ab - cfg.tolerance, bb), min=0.0)


def pair_triton(aa, ab, bb, tolerance, alpha):
    positive = bb > 0.0
    lam = tl.where(positive, (-ab - tolerance) / tl.where(positive, bb, 1.0), 0.0)
    return tl.full((), 1.0, tl.float64), tl.where(lam < 0.0, 0.0, lam)  # the comparison keeps a NaN, like torch.clamp


RULE = SurgeryRule("ungrad", "unilateral: correct g_f only when it conflicts with g_r", pair, pair_triton)
