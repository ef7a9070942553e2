"""GradDiff / linear scalarisation: d = g_f + alpha * g_r, alpha fixed (no surgery)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SurgeryConfig
from .base import SurgeryRule

tl = None  # bound by the Triton backend before it compiles pair_triton


def pair(aa: Tensor, ab: Tensor, bb: Tensor, cfg: SurgeryConfig) -> tuple[Tensor, Tensor]:
    return torch.ones_like(aa), torch.full_like(aa, cfg.alpha)


def pair_triton(aa, ab, bb, tolerance, alpha):
    return tl.full((), 1.0, tl.float64), tl.full((), alpha, tl.float64)


RULE = SurgeryRule("graddiff", "fixed weighting d = g_f + alpha g_r", pair, pair_triton)
