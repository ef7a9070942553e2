"""Fused combine + base update (SGD, Adam, AdamW) and combine-only kernels.

Every kernel reads the coefficient vector by pointer: ``ca``, ``cb`` and ``skip``. When skip is
set a program returns before touching memory, so parameters, state and step counts stay as they
were without the host ever looking at the flag.

One step of a group is two launches:

1. ``_advance_steps_kernel`` (one lane per tensor) reads each ``step`` tensor, writes the
   per-tensor scalars the update needs (Adam: the bias corrections 1 - beta1^t and
   sqrt(1 - beta2^t), computed in float64 like the torch backend; SGD: whether this is the
   momentum buffer's first step) and increments ``step``;
2. the update kernel (one program per block) does d = ca*g_f + cb*g_r and the rule in float32,
   reading p, g_f, g_r and state in their storage dtypes and writing p and state back.

Splitting the step increment off keeps the blocks of one tensor from racing on its counter.
Hyperparameters are runtime arguments (an LR schedule never recompiles); betas travel as a
float32 pair (hi, lo) with hi + lo == beta in float64, because scalar kernel arguments are float32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import ALIGN, SKIP_SLOT, masked_offsets, tl_dtype
from .tables import BLOCK, TensorTable

STEP_LANES = 1024
POWER_BITS = 31  # exponents up to 2**31 - 1 (the float32 step stops growing at 2**24)
NUM_WARPS = 8


@triton.jit
def _int_power(base, exponent, BITS: tl.constexpr):
    """base ** exponent (float64 base, int32 exponents >= 0) by repeated squaring."""
    result = tl.zeros(exponent.shape, dtype=tl.float64) + 1.0
    square = result * base
    for bit in tl.static_range(BITS):
        result = tl.where(((exponent >> bit) & 1) != 0, result * square, result)
        square = square * square
    return result


@triton.jit(do_not_specialize=["n_tensors"])
def _advance_steps_kernel(step_addresses, n_tensors, coef, scalars, beta1_hi, beta1_lo, beta2_hi, beta2_lo,
                          BIAS_CORRECTION: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr):
    idx = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = idx < n_tensors
    ptrs = tl.load(step_addresses + idx, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(ptrs, mask=mask, other=0.0)
    if BIAS_CORRECTION:
        t = tl.minimum(step + 1.0, 1073741824.0).to(tl.int32)
        beta1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
        beta2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
        bc1 = (1.0 - _int_power(beta1, t, BITS)).to(tl.float32)
        bc2 = (1.0 - _int_power(beta2, t, BITS)).to(tl.float32)
        tl.store(scalars + idx, bc1, mask=mask)
        tl.store(scalars + n_tensors + idx, tl.sqrt_rn(bc2), mask=mask)
    else:
        tl.store(scalars + idx, tl.where(step == 0.0, 1.0, 0.0), mask=mask)
    if tl.load(coef + SKIP_SLOT) == 0.0:
        tl.store(ptrs, step + 1.0, mask=mask)


@triton.jit
def _sgd_block(addr_p, addr_f, addr_r, addr_buf, owner, offs, mask, other, ca, cb, first, lr, weight_decay,
               momentum, one_minus_dampening, nesterov, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
               HAS_R: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FAST: tl.constexpr):
    p_ptr = tl.load(addr_p + owner).to(tl.pointer_type(P_DTYPE))
    f_ptr = tl.load(addr_f + owner).to(tl.pointer_type(P_DTYPE))
    r_ptr = tl.load(addr_r + owner).to(tl.pointer_type(P_DTYPE))
    buf_ptr = tl.load(addr_buf + owner).to(tl.pointer_type(S_DTYPE))
    if FAST:
        p_ptr = tl.multiple_of(p_ptr, ALIGN)
        f_ptr = tl.multiple_of(f_ptr, ALIGN)
        r_ptr = tl.multiple_of(r_ptr, ALIGN)
        buf_ptr = tl.multiple_of(buf_ptr, ALIGN)
    d = tl.load(f_ptr + offs, mask=mask, other=other).to(tl.float32) * ca
    if HAS_R:
        d = d + tl.load(r_ptr + offs, mask=mask, other=other).to(tl.float32) * cb
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    d = d + weight_decay * p
    if HAS_MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask, other=other).to(tl.float32)
        buf = tl.where(first != 0.0, d, buf * momentum + one_minus_dampening * d)
        tl.store(buf_ptr + offs, buf.to(S_DTYPE), mask=mask)
        d = tl.where(nesterov != 0, d + momentum * buf, buf)
    tl.store(p_ptr + offs, (p - lr * d).to(P_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["nesterov"])
def _sgd_kernel(addr_p, addr_f, addr_r, addr_buf, numels, block_owner, block_index, block_fast, coef, scalars,
                lr, weight_decay, momentum, one_minus_dampening, nesterov,
                P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_R: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.load(coef + SKIP_SLOT) == 0.0:
        ca = tl.load(coef)
        cb = tl.load(coef + 1)
        owner = tl.load(block_owner + pid)
        first = tl.load(scalars + owner)
        start = tl.load(block_index + pid) * BLOCK
        if tl.load(block_fast + pid) != 0:
            lanes = start + tl.arange(0, BLOCK)
            _sgd_block(addr_p, addr_f, addr_r, addr_buf, owner, lanes, None, None, ca, cb, first, lr, weight_decay,
                       momentum, one_minus_dampening, nesterov, P_DTYPE, S_DTYPE, HAS_R, HAS_MOMENTUM, True)
        else:
            tile = masked_offsets(start, BLOCK)
            mask = tile < tl.load(numels + owner)
            _sgd_block(addr_p, addr_f, addr_r, addr_buf, owner, tile, mask, 0.0, ca, cb, first, lr, weight_decay,
                       momentum, one_minus_dampening, nesterov, P_DTYPE, S_DTYPE, HAS_R, HAS_MOMENTUM, False)


@triton.jit
def _adam_block(addr_p, addr_f, addr_r, addr_m, addr_v, owner, offs, mask, other, ca, cb, step_size, bc2_sqrt,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_R: tl.constexpr, DECOUPLED: tl.constexpr,
                UNCORRECTED: tl.constexpr, FAST: tl.constexpr):
    p_ptr = tl.load(addr_p + owner).to(tl.pointer_type(P_DTYPE))
    f_ptr = tl.load(addr_f + owner).to(tl.pointer_type(P_DTYPE))
    r_ptr = tl.load(addr_r + owner).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(addr_m + owner).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(addr_v + owner).to(tl.pointer_type(S_DTYPE))
    if FAST:
        p_ptr = tl.multiple_of(p_ptr, ALIGN)
        f_ptr = tl.multiple_of(f_ptr, ALIGN)
        r_ptr = tl.multiple_of(r_ptr, ALIGN)
        m_ptr = tl.multiple_of(m_ptr, ALIGN)
        v_ptr = tl.multiple_of(v_ptr, ALIGN)
    g = tl.load(f_ptr + offs, mask=mask, other=other).to(tl.float32)
    d = g * ca
    if HAS_R:
        d = d + tl.load(r_ptr + offs, mask=mask, other=other).to(tl.float32) * cb
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    if UNCORRECTED:
        if not DECOUPLED:
            g = g + weight_decay * p  # the uncorrected gradient with its L2 term (update space)
    if DECOUPLED:
        p = p * decay_factor
    else:
        d = d + weight_decay * p
    m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
    # torch.lerp(m, d, w) picks between two algebraically equal forms for accuracy
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (d - m), d - (d - m) * (1.0 - one_minus_beta1))
    if UNCORRECTED:
        # update space (docs/design.md, Update-space surgery): the step's denominator comes from the
        # uncorrected gradient, exactly as update_space.terms computes it; the stored moment as usual
        v_before = v * beta2
        v = v_before + one_minus_beta2 * d * d
        denom = tl.sqrt_rn(v_before + one_minus_beta2 * g * g) / bc2_sqrt + eps
    else:
        v = v * beta2 + one_minus_beta2 * d * d
        denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)
    tl.store(p_ptr + offs, (p - step_size * (m / denom)).to(P_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["n_tensors"])
def _adam_kernel(addr_p, addr_f, addr_r, addr_m, addr_v, numels, block_owner, block_index, block_fast, coef,
                 scalars, n_tensors, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                 P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_R: tl.constexpr, DECOUPLED: tl.constexpr,
                 UNCORRECTED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.load(coef + SKIP_SLOT) == 0.0:
        ca = tl.load(coef)
        cb = tl.load(coef + 1)
        owner = tl.load(block_owner + pid)
        step_size = lr / tl.load(scalars + owner)
        bc2_sqrt = tl.load(scalars + n_tensors + owner)
        start = tl.load(block_index + pid) * BLOCK
        if tl.load(block_fast + pid) != 0:
            lanes = start + tl.arange(0, BLOCK)
            _adam_block(addr_p, addr_f, addr_r, addr_m, addr_v, owner, lanes, None, None, ca, cb, step_size,
                        bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                        P_DTYPE, S_DTYPE, HAS_R, DECOUPLED, UNCORRECTED, True)
        else:
            tile = masked_offsets(start, BLOCK)
            mask = tile < tl.load(numels + owner)
            _adam_block(addr_p, addr_f, addr_r, addr_m, addr_v, owner, tile, mask, 0.0, ca, cb, step_size,
                        bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                        P_DTYPE, S_DTYPE, HAS_R, DECOUPLED, UNCORRECTED, False)


@triton.jit
def _combine_block(addr_f, addr_r, owner, offs, mask, other, ca, cb, G_DTYPE: tl.constexpr, HAS_R: tl.constexpr,
                   FAST: tl.constexpr):
    f_ptr = tl.load(addr_f + owner).to(tl.pointer_type(G_DTYPE))
    r_ptr = tl.load(addr_r + owner).to(tl.pointer_type(G_DTYPE))
    if FAST:
        f_ptr = tl.multiple_of(f_ptr, ALIGN)
        r_ptr = tl.multiple_of(r_ptr, ALIGN)
    d = tl.load(f_ptr + offs, mask=mask, other=other).to(tl.float32) * ca
    if HAS_R:
        d = d + tl.load(r_ptr + offs, mask=mask, other=other).to(tl.float32) * cb
    tl.store(f_ptr + offs, d.to(G_DTYPE), mask=mask)


@triton.jit
def _combine_kernel(addr_f, addr_r, numels, block_owner, block_index, block_fast, coef,
                    G_DTYPE: tl.constexpr, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.load(coef + SKIP_SLOT) == 0.0:
        ca = tl.load(coef)
        cb = tl.load(coef + 1)
        owner = tl.load(block_owner + pid)
        start = tl.load(block_index + pid) * BLOCK
        if tl.load(block_fast + pid) != 0:
            lanes = start + tl.arange(0, BLOCK)
            _combine_block(addr_f, addr_r, owner, lanes, None, None, ca, cb, G_DTYPE, HAS_R, True)
        else:
            tile = masked_offsets(start, BLOCK)
            mask = tile < tl.load(numels + owner)
            _combine_block(addr_f, addr_r, owner, tile, mask, 0.0, ca, cb, G_DTYPE, HAS_R, False)


def split_beta(beta: float) -> tuple[float, float]:
    """(hi, lo) float32 values with hi + lo == beta to about 2**-48 relative."""
    hi = _round_f32(beta)
    return hi, _round_f32(beta - hi)


def _round_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class Roles:
    """Row of each role in a group's table; None marks an absent role (its kernel argument is a dummy)."""

    param: int = 0
    grad_f: int = 0
    grad_r: int | None = None
    state1: int | None = None  # momentum_buffer (sgd) or exp_avg (adam)
    state2: int | None = None  # exp_avg_sq (adam)


@dataclass(frozen=True)
class Launch:
    """What every block launch of one group needs: the table, its roles, dtypes and coefficients."""

    table: TensorTable
    roles: Roles
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    coef: Tensor

    def row(self, r: int | None) -> Tensor:
        return self.table.role(self.roles.param if r is None else r)

    @property
    def has_r(self) -> bool:
        return self.roles.grad_r is not None


def _advance_steps(launch: Launch, beta1: float, beta2: float, bias_correction: bool) -> Tensor:
    table = launch.table
    if table.scalar_addresses is None:
        raise ValueError("a step table needs the per-tensor step addresses")
    scalars = torch.empty(2 * table.n_tensors, dtype=torch.float32, device=launch.coef.device)
    b1_hi, b1_lo = split_beta(beta1)
    b2_hi, b2_lo = split_beta(beta2)
    grid = (triton.cdiv(table.n_tensors, STEP_LANES),)
    _advance_steps_kernel[grid](table.scalar_addresses, table.n_tensors, launch.coef, scalars,
                                b1_hi, b1_lo, b2_hi, b2_lo,
                                BIAS_CORRECTION=bias_correction, BITS=POWER_BITS, LANES=STEP_LANES, num_warps=4)
    return scalars


def sgd_step(launch: Launch, lr: float, weight_decay: float, momentum: float, dampening: float,
             nesterov: bool) -> None:
    scalars = _advance_steps(launch, 0.0, 0.0, bias_correction=False)
    table, roles = launch.table, launch.roles
    if table.n_blocks == 0:
        return
    _sgd_kernel[(table.n_blocks,)](
        launch.row(roles.param), launch.row(roles.grad_f), launch.row(roles.grad_r), launch.row(roles.state1),
        table.numels, table.block_owner, table.block_index, table.block_fast, launch.coef, scalars,
        float(lr), float(weight_decay), float(momentum), float(1.0 - dampening), int(bool(nesterov)),
        P_DTYPE=tl_dtype(launch.param_dtype), S_DTYPE=tl_dtype(launch.state_dtype), HAS_R=launch.has_r,
        HAS_MOMENTUM=roles.state1 is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def adam_step(launch: Launch, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled: bool, uncorrected: bool = False) -> None:
    """One Adam/AdamW step; ``uncorrected`` (update-space surgery): the denominator from g_f, not d."""
    scalars = _advance_steps(launch, beta1, beta2, bias_correction=True)
    table, roles = launch.table, launch.roles
    if table.n_blocks == 0:
        return
    _adam_kernel[(table.n_blocks,)](
        launch.row(roles.param), launch.row(roles.grad_f), launch.row(roles.grad_r), launch.row(roles.state1),
        launch.row(roles.state2), table.numels, table.block_owner, table.block_index, table.block_fast,
        launch.coef, scalars, table.n_tensors, float(lr), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
        float(eps), float(weight_decay), float(1.0 - lr * weight_decay),
        P_DTYPE=tl_dtype(launch.param_dtype), S_DTYPE=tl_dtype(launch.state_dtype), HAS_R=launch.has_r,
        DECOUPLED=decoupled, UNCORRECTED=bool(uncorrected), BLOCK=BLOCK, num_warps=NUM_WARPS)


def combine(launch: Launch) -> None:
    """g_f <- ca*g_f + cb*g_r in place, unless skip."""
    table, roles = launch.table, launch.roles
    if table.n_blocks == 0:
        return
    _combine_kernel[(table.n_blocks,)](
        launch.row(roles.grad_f), launch.row(roles.grad_r), table.numels, table.block_owner, table.block_index,
        table.block_fast, launch.coef, G_DTYPE=tl_dtype(launch.param_dtype), HAS_R=launch.has_r, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
