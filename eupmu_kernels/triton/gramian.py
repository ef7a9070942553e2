"""Gramian of two tensor lists in two launches, deterministic and float32-accumulated.

Launch 1 (one program per table block) writes the block's partial sums of <a,a>, <a,b>, <b,b>
to fixed slots ``partials[k, block]``. Launch 2 (one program) adds the slots in a fixed order.
No atomics anywhere, so the same inputs give bit-identical results; a non-finite input makes
its partial (and hence the total) non-finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import ALIGN, tl_dtype
from .tables import BLOCK, TensorTable

FINISH_BLOCK = 1024
NUM_WARPS = 8


@triton.jit
def _block_dots(addr_a, addr_b, owner, offs, mask, other, DTYPE: tl.constexpr, HAS_B: tl.constexpr,
                FAST: tl.constexpr):
    a_ptr = tl.load(addr_a + owner).to(tl.pointer_type(DTYPE))
    if FAST:
        a_ptr = tl.multiple_of(a_ptr, ALIGN)
    a = tl.load(a_ptr + offs, mask=mask, other=other).to(tl.float32)
    aa = tl.sum(a * a, axis=0)
    if HAS_B:
        b_ptr = tl.load(addr_b + owner).to(tl.pointer_type(DTYPE))
        if FAST:
            b_ptr = tl.multiple_of(b_ptr, ALIGN)
        b = tl.load(b_ptr + offs, mask=mask, other=other).to(tl.float32)
        ab = tl.sum(a * b, axis=0)
        bb = tl.sum(b * b, axis=0)
    else:
        ab = aa
        bb = aa
    return aa, ab, bb


@triton.jit
def _gramian_blocks_kernel(addr_a, addr_b, numels, block_owner, block_index, block_fast, partials, n_blocks,
                           DTYPE: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    owner = tl.load(block_owner + pid)
    offs = tl.load(block_index + pid) * BLOCK + tl.arange(0, BLOCK)
    if tl.load(block_fast + pid) != 0:
        aa, ab, bb = _block_dots(addr_a, addr_b, owner, offs, None, None, DTYPE, HAS_B, True)
    else:
        mask = offs < tl.load(numels + owner)
        aa, ab, bb = _block_dots(addr_a, addr_b, owner, offs, mask, 0.0, DTYPE, HAS_B, False)
    tl.store(partials + pid, aa)
    if HAS_B:  # without b the finishing kernel writes zeros for <a,b> and <b,b>
        tl.store(partials + n_blocks + pid, ab)
        tl.store(partials + 2 * n_blocks + pid, bb)


@triton.jit
def _gramian_finish_kernel(partials, out, n_blocks, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    acc_aa = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ab = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_blocks
        acc_aa += tl.load(partials + idx, mask=mask, other=0.0)
        if HAS_B:
            acc_ab += tl.load(partials + n_blocks + idx, mask=mask, other=0.0)
            acc_bb += tl.load(partials + 2 * n_blocks + idx, mask=mask, other=0.0)
    tl.store(out, tl.sum(acc_aa, axis=0))
    tl.store(out + 1, tl.sum(acc_ab, axis=0))
    tl.store(out + 2, tl.sum(acc_bb, axis=0))


def gramian(table: TensorTable, dtype: torch.dtype, has_b: bool, device: torch.device) -> Tensor:
    """float32[3] (<a,a>, <a,b>, <b,b>) of the table's roles 0 (a) and 1 (b); zeros for b when absent."""
    out = torch.empty(3, dtype=torch.float32, device=device)
    n_blocks = table.n_blocks
    partials = torch.empty(3 * max(n_blocks, 1), dtype=torch.float32, device=device)
    if n_blocks > 0:
        addr_b = table.role(1) if has_b else table.role(0)
        _gramian_blocks_kernel[(n_blocks,)](
            table.role(0), addr_b, table.numels, table.block_owner, table.block_index, table.block_fast, partials,
            n_blocks, DTYPE=tl_dtype(dtype), HAS_B=has_b, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _gramian_finish_kernel[(1,)](partials, out, n_blocks, HAS_B=has_b, BLOCK=FINISH_BLOCK, num_warps=4)
    return out
