"""Gradient pairs at the edges of the float32/bfloat16/float16 range, and their float64 truth.

Shared by the backend tests of the Gramian's numerical range: every backend must give the
Gramian and lambda of the stored values to float64 accuracy, whether the element products are
far below the smallest normal float32 (1.2e-38) or their sums far above the largest (3.4e38).
"""

from __future__ import annotations

import torch
from torch import Tensor

RANGE_SHAPES = [(7,), (4097,)]  # a small tensor, a full block and a masked tail


def _normal(shapes, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def tiny_forget_pair(dtype: torch.dtype, norm_r: float, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """g_f = -g_r * 1e-30 with ||g_r|| = norm_r (before rounding to ``dtype``)."""
    r = _normal(RANGE_SHAPES, seed)
    total = torch.cat([t.reshape(-1) for t in r]).norm()
    r = [(t * (norm_r / total)).to(dtype) for t in r]
    f = [(-t.double() * 1e-30).to(dtype) for t in r]
    return f, r


def huge_pair(dtype: torch.dtype, scale: float = 1e20, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Conflicting gradients with elements of about ``scale`` (finite; <g,g> ~ 4e3 * scale**2)."""
    r = _normal(RANGE_SHAPES, seed)
    noise = _normal(RANGE_SHAPES, seed + 1)
    f = [(-0.5 * x + 0.3 * z) * scale for x, z in zip(r, noise)]
    return [t.to(dtype) for t in f], [(t * scale).to(dtype) for t in r]


def wide_range_pair(dtype: torch.dtype, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Elements spread over the whole normal and subnormal range of ``dtype`` (float16: 6e-8 to 6e4)."""
    info = torch.finfo(dtype)
    lo, hi = torch.log10(torch.tensor(info.smallest_normal * info.eps)), torch.log10(torch.tensor(info.max / 8))
    gen = torch.Generator().manual_seed(seed)

    def spread(shapes):
        out = []
        for s in shapes:
            exponent = lo + (hi - lo) * torch.rand(s, generator=gen, dtype=torch.float64)
            out.append(torch.randn(s, generator=gen, dtype=torch.float64).sign() * 10.0 ** exponent)
        return out

    r = spread(RANGE_SHAPES)
    f = [-0.5 * x + 0.25 * z for x, z in zip(r, spread(RANGE_SHAPES))]
    return [t.to(dtype) for t in f], [t.to(dtype) for t in r]


def truth(f: list[Tensor], r: list[Tensor]) -> dict[str, float]:
    """Gramian, lambda (eps = 0) and cosine of the stored values, in float64."""
    x = torch.cat([t.reshape(-1).double() for t in f])
    y = torch.cat([t.reshape(-1).double() for t in r])
    aa, ab, bb = float(x @ x), float(x @ y), float(y @ y)
    return {"aa": aa, "ab": ab, "bb": bb, "lam": max(0.0, -ab / bb), "cos": ab / (aa ** 0.5 * bb ** 0.5)}
