"""Constants and helpers shared by the Triton kernels.

Every block kernel has two paths, chosen per block by ``block_fast`` of the table (see
``tables``): the fast path (a full block of 16-byte aligned tensors: loads and stores without a
mask, pointers hinted as 16-byte aligned, so the compiler can vectorise them) and the general
path (masked, no hint). The body of a kernel is one ``@triton.jit`` function called with
``FAST=True, mask=None, other=None`` or ``FAST=False, mask, other``; the hint is applied to
pointers created inside the ``FAST=True`` specialisation only, so the general path never
inherits it. (Bodies are written out rather than split into many small helpers: the
interpreter pays about a millisecond per nested call.)

The general path addresses its block as a [BLOCK // MASKED_COLS, MASKED_COLS] tile
(``masked_offsets``), not as the fast path's [BLOCK] vector. Triton picks one register layout
for all memory accesses of the same shape that share inputs, sized for the widest of them: with
one shape the masked loads inherited the fast path's 16-byte layout while the masked stores
could not, and every masked block went through a shared-memory layout conversion (spilling
registers in one kernel at sm_90). A shape of its own gives the general path one element per
access for loads and stores alike, and still coalesced rows (docs/design.md, GPU readiness).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import SKIP

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Largest finite float32 and float64: |x| <= MAX is false exactly for inf and nan (and, for
# FLT_MAX, for float64 values beyond the float32 range).
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
DBL_MAX: tl.constexpr = tl.constexpr(1.7976931348623157e308)
SKIP_SLOT: tl.constexpr = tl.constexpr(SKIP)
ALIGN: tl.constexpr = tl.constexpr(16)
MASKED_COLS: tl.constexpr = tl.constexpr(32)


@triton.jit
def masked_offsets(start, BLOCK: tl.constexpr):
    """Element offsets start + [0, BLOCK) of a general-path block, as a [BLOCK // MASKED_COLS, MASKED_COLS] tile."""
    rows = tl.arange(0, BLOCK // MASKED_COLS)
    cols = tl.arange(0, MASKED_COLS)
    return start + (rows[:, None] * MASKED_COLS + cols[None, :])


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return TL_DTYPES[dtype]


def aligned(t: Tensor) -> Tensor:
    """``t`` itself when its address is 16-byte aligned, else an aligned copy.

    Triton compiles one variant of a kernel per alignment class of each pointer argument; keeping
    every pointer argument aligned means each launch uses the one variant that the readiness
    check compiles (docs/design.md, GPU readiness)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()
