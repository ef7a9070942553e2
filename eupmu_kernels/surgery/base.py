"""What every surgery-rule unit provides, and the torch helpers their formulas share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..contract import SurgeryConfig

PairFn = Callable[[Tensor, Tensor, Tensor, SurgeryConfig], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class SurgeryRule:
    """``pair(aa, ab, bb, cfg) -> (a, b)`` on float64 device scalars (torch), and the same formula
    as ``pair_triton(aa, ab, bb, tolerance, alpha) -> (a, b)``, a plain function whose body is
    Triton code: the Triton backend binds ``tl`` in its module and compiles it."""

    name: str
    summary: str
    pair: PairFn
    pair_triton: Callable


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (without producing inf/nan in the selected branch)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))
