"""The one-gradient case (implicit mode): d = g_f; only clipping, unscaling and the guard apply."""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SurgeryConfig
from .base import SurgeryRule

tl = None  # bound by the Triton backend before it compiles pair_triton


def pair(aa: Tensor, ab: Tensor, bb: Tensor, cfg: SurgeryConfig) -> tuple[Tensor, Tensor]:
    return torch.ones_like(aa), torch.zeros_like(aa)


def pair_triton(aa, ab, bb, tolerance, alpha):
    return tl.full((), 1.0, tl.float64), tl.full((), 0.0, tl.float64)


RULE = SurgeryRule("none", "no second gradient: d = g_f", pair, pair_triton)
