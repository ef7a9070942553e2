"""PCGrad for two tasks (sum reduction): when <g_f,g_r> < 0 each gradient loses its component along
the other (both projections use the original gradients), d = g_f' + g_r'; otherwise d = g_f + g_r.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SurgeryConfig
from .base import SurgeryRule, safe_div

tl = None  # bound by the Triton backend before it compiles pair_triton


def pair(aa: Tensor, ab: Tensor, bb: Tensor, cfg: SurgeryConfig) -> tuple[Tensor, Tensor]:
    conflict = ab < 0
    one = torch.ones_like(aa)
    return torch.where(conflict, 1.0 - safe_div(ab, aa), one), torch.where(conflict, 1.0 - safe_div(ab, bb), one)


def pair_triton(aa, ab, bb, tolerance, alpha):
    conflict = ab < 0.0
    a = tl.where(conflict, 1.0 - tl.where(aa > 0.0, ab / tl.where(aa > 0.0, aa, 1.0), 0.0), 1.0)
    b = tl.where(conflict, 1.0 - tl.where(bb > 0.0, ab / tl.where(bb > 0.0, bb, 1.0), 0.0), 1.0)
    return a, b


RULE = SurgeryRule("pcgrad", "bilateral projection of conflicting gradients (two tasks)", pair, pair_triton)
