"""Shared test utilities: awkward tensor-list shapes and flattening for the float64 reference."""

from __future__ import annotations

import torch
from torch import Tensor

# Awkward sizes from the standards: singletons, odd sizes, one past a power of two,
# and many small tensors plus one large one.
SIZE_CASES = {
    "one": [(1,)],
    "seven": [(7,)],
    "4097": [(4097,)],
    "many_small_plus_large": [(3 + (i * 7) % 29,) for i in range(50)] + [(280, 250)],
}
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tolerance on outputs *stored* in a dtype: one rounding of the stored value plus fp32 math.
STORE_RTOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def make_tensors(shapes, dtype=torch.float32, seed=0, scale=1.0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def flat64(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """Relative error measured against the norm of the expected vector (robust for tiny entries)."""
    actual = actual.to(torch.float64).reshape(-1)
    expected = expected.to(torch.float64).reshape(-1)
    scale = expected.norm().clamp_min(1e-30)
    err = (actual - expected).norm() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
