"""Gramian of two tensor lists in two launches, deterministic and float64-accumulated.

Launch 1 (one program per table block) writes the block's partial sums of <a,a>, <a,b>, <b,b>
to fixed slots ``partials[k, block]``. Launch 2 (one program) adds the slots in a fixed order.
No atomics anywhere, so the same inputs give bit-identical results; a non-finite input makes
its partial (and hence the total) non-finite.

Elements are widened to float64 before they are multiplied (docs/design.md, Kernel contract:
numerical range of the Gramian). The product of two float32 values is exact in float64, and
float64 holds the square of any finite float32/float16/bfloat16 value (at most about 1.2e77)
and of the smallest subnormal (about 2e-90), so neither overflow nor underflow can turn a
finite gradient into a skipped step or a vanished lambda; the result is float64[3].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import ALIGN, masked_offsets, tl_dtype
from .tables import BLOCK, TensorTable

FINISH_BLOCK = 1024
NUM_WARPS = 8
FINISH_WARPS = 4


@triton.jit
def load_f32(addr, owner, offs, mask, other, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """The block's stored values as float32, exactly.

    bfloat16 is read as its 16 bits and widened by a shift: exact for every value, subnormals
    included (the interpreter's own bf16 -> fp32 conversion is wrong for subnormals; on a GPU
    both are the same shift). The other dtypes convert through float32, which is exact."""
    if DTYPE == tl.bfloat16:
        ptr = tl.load(addr + owner).to(tl.pointer_type(tl.uint16))
        if FAST:
            ptr = tl.multiple_of(ptr, ALIGN)
        bits = tl.load(ptr + offs, mask=mask, other=other).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        ptr = tl.load(addr + owner).to(tl.pointer_type(DTYPE))
        if FAST:
            ptr = tl.multiple_of(ptr, ALIGN)
        x = tl.load(ptr + offs, mask=mask, other=other).to(tl.float32)
    return x


@triton.jit
def _total(x, FAST: tl.constexpr):
    """Sum of a fast-path vector or of a general-path tile (fixed order either way)."""
    if FAST:
        return tl.sum(x, axis=0)
    else:
        return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _block_dots(addr_a, addr_b, owner, offs, mask, other, DTYPE: tl.constexpr, HAS_B: tl.constexpr,
                FAST: tl.constexpr):
    a = load_f32(addr_a, owner, offs, mask, other, DTYPE, FAST).to(tl.float64)
    aa = _total(a * a, FAST)
    if HAS_B:
        b = load_f32(addr_b, owner, offs, mask, other, DTYPE, FAST).to(tl.float64)
        ab = _total(a * b, FAST)
        bb = _total(b * b, FAST)
    else:
        ab = aa
        bb = aa
    return aa, ab, bb


@triton.jit(do_not_specialize=["n_blocks"])
def _gramian_blocks_kernel(addr_a, addr_b, numels, block_owner, block_index, block_fast, partials, n_blocks,
                           DTYPE: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    owner = tl.load(block_owner + pid)
    start = tl.load(block_index + pid) * BLOCK
    if tl.load(block_fast + pid) != 0:
        lanes = start + tl.arange(0, BLOCK)
        aa, ab, bb = _block_dots(addr_a, addr_b, owner, lanes, None, None, DTYPE, HAS_B, True)
    else:
        tile = masked_offsets(start, BLOCK)
        mask = tile < tl.load(numels + owner)
        aa, ab, bb = _block_dots(addr_a, addr_b, owner, tile, mask, 0, DTYPE, HAS_B, False)
    tl.store(partials + pid, aa)
    if HAS_B:  # without b the finishing kernel writes zeros for <a,b> and <b,b>
        tl.store(partials + n_blocks + pid, ab)
        tl.store(partials + 2 * n_blocks + pid, bb)


@triton.jit(do_not_specialize=["n_blocks"])
def _gramian_finish_kernel(partials, out, n_blocks, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    acc_aa = tl.zeros([BLOCK], dtype=tl.float64)
    acc_ab = tl.zeros([BLOCK], dtype=tl.float64)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float64)
    # A while loop rather than range(0, n_blocks, BLOCK): the triton 3.6 interpreter cannot take
    # a runtime scalar as a range bound under NumPy >= 2.4 (compiled code is the same loop).
    start = 0
    while start < n_blocks:
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_blocks
        acc_aa += tl.load(partials + idx, mask=mask, other=0.0)
        if HAS_B:
            acc_ab += tl.load(partials + n_blocks + idx, mask=mask, other=0.0)
            acc_bb += tl.load(partials + 2 * n_blocks + idx, mask=mask, other=0.0)
        start += BLOCK
    tl.store(out, tl.sum(acc_aa, axis=0))
    tl.store(out + 1, tl.sum(acc_ab, axis=0))
    tl.store(out + 2, tl.sum(acc_bb, axis=0))


def gramian(table: TensorTable, dtype: torch.dtype, has_b: bool, device: torch.device) -> Tensor:
    """float64[3] (<a,a>, <a,b>, <b,b>) of the table's roles 0 (a) and 1 (b); zeros for b when absent."""
    out = torch.empty(3, dtype=torch.float64, device=device)
    n_blocks = table.n_blocks
    partials = torch.empty(3 * max(n_blocks, 1), dtype=torch.float64, device=device)
    if n_blocks > 0:
        addr_b = table.role(1) if has_b else table.role(0)
        _gramian_blocks_kernel[(n_blocks,)](
            table.role(0), addr_b, table.numels, table.block_owner, table.block_index, table.block_fast, partials,
            n_blocks, DTYPE=tl_dtype(dtype), HAS_B=has_b, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _gramian_finish_kernel[(1,)](partials, out, n_blocks, HAS_B=has_b, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return out
