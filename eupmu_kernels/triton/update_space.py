"""Update-space surgery (docs/design.md, Update-space surgery): the reduction pass and its coefficients.

``terms``: one reduction pass over a group's step table (p, g_f, g_r and the rule's state, the
same table the update kernels use) gives float64[TERMS_LEN], the Gramian (<g_f,g_f>, <g_f,g_r>,
<g_r,g_r>) and the terms (K0, K1, K2, T0) of the retain change, in two launches like the Gramian:

1. one program per table block forms the block's dot products (elements widened to float64
   before they are multiplied, as in ``gramian``), scales them by its tensor's float64 factors
   (learning rate, SGD's momentum and dampening shares s_b and s_d from the step count, Adam's
   1/(1 - beta1^t)) and writes TERMS_LEN partials to fixed slots;
2. one program adds the slots in a fixed order. No atomics: the same inputs give the same bits.

Adam's preconditioner P = 1/(sqrt(v_bar)/sqrt(1 - beta2^t) + eps), v_bar = beta2*v + (1 - beta2)*g0^2
with g0 the uncorrected gradient (plus the L2 term), is formed in float32 with the very operations
the update kernel's ``UNCORRECTED`` path uses, so the terms describe the denominators the step
applies; only the products with it are float64.

``coefficients``: a single-program kernel, the float64 solve of ``eupmu_kernels.coefficients
.update_space_coefficients`` operation for operation (fixed-point iterations under clipping),
lambda* rounded up to float32. Nothing is read by the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import contract
from ..contract import COEF_LEN, StepHyper, SurgeryConfig, rule_codes
from ..contract import CLIP_EPS, CLIP_ITERATIONS, TERMS_LEN
from .common import DBL_MAX, FLT_MAX, aligned, masked_offsets, tl_dtype
from .gramian import _total, load_f32
from .tables import BLOCK, TensorTable
from .update import POWER_BITS, _int_power, split_beta

# slots of the terms and of the coefficient vector, from the contract
AA: tl.constexpr = tl.constexpr(contract.TERM_AA)
AB: tl.constexpr = tl.constexpr(contract.TERM_AB)
BB: tl.constexpr = tl.constexpr(contract.TERM_BB)
K0: tl.constexpr = tl.constexpr(contract.TERM_K0)
K1: tl.constexpr = tl.constexpr(contract.TERM_K1)
K2: tl.constexpr = tl.constexpr(contract.TERM_K2)
T0: tl.constexpr = tl.constexpr(contract.TERM_T0)
CA: tl.constexpr = tl.constexpr(contract.CA)
CB: tl.constexpr = tl.constexpr(contract.CB)
SKIP: tl.constexpr = tl.constexpr(contract.SKIP)
LAM: tl.constexpr = tl.constexpr(contract.LAM)
CLIP: tl.constexpr = tl.constexpr(contract.CLIP)
COS: tl.constexpr = tl.constexpr(contract.COS)
DNORM: tl.constexpr = tl.constexpr(contract.DNORM)
A: tl.constexpr = tl.constexpr(contract.A)
RULE_CODE = rule_codes()
RULE_SGD: tl.constexpr = tl.constexpr(RULE_CODE["sgd"])
RULE_ADAMW: tl.constexpr = tl.constexpr(RULE_CODE["adamw"])
FINISH_BLOCK = 1024
NUM_WARPS = 8
FINISH_WARPS = 4


@triton.jit
def _block_sums(addr_p, addr_f, addr_r, addr_s1, addr_s2, owner, offs, mask, other, bc2_sqrt, beta2, one_minus_beta2,
                eps, weight_decay32, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, RULE: tl.constexpr,
                HAS_S1: tl.constexpr, FAST: tl.constexpr):
    """The block's float64 sums: <f,f>, <f,r>, <r,r>, <p,r>, <s,r> (SGD: s = the momentum buffer;
    Adam: <m, P r>), and for Adam <p, P r>, <f, P r>, <r, P r> (zero for SGD)."""
    f32 = load_f32(addr_f, owner, offs, mask, other, P_DTYPE, FAST)
    r32 = load_f32(addr_r, owner, offs, mask, other, P_DTYPE, FAST)
    p32 = load_f32(addr_p, owner, offs, mask, other, P_DTYPE, FAST)
    f = f32.to(tl.float64)
    r = r32.to(tl.float64)
    p = p32.to(tl.float64)
    ff = _total(f * f, FAST)
    fr = _total(f * r, FAST)
    rr = _total(r * r, FAST)
    pr = _total(p * r, FAST)
    zero = pr * 0.0
    if RULE == RULE_SGD:
        if HAS_S1:
            s = load_f32(addr_s1, owner, offs, mask, other, S_DTYPE, FAST).to(tl.float64)
            sr = _total(s * r, FAST)
        else:
            sr = zero
        p_pr = zero
        f_pr = zero
        r_pr = zero
    else:
        m = load_f32(addr_s1, owner, offs, mask, other, S_DTYPE, FAST).to(tl.float64)
        v = load_f32(addr_s2, owner, offs, mask, other, S_DTYPE, FAST)
        g0 = f32
        if RULE != RULE_ADAMW:
            g0 = g0 + weight_decay32 * p32  # Adam's L2 term, as the update kernel adds it
        # the update kernel's UNCORRECTED denominator, operation for operation (float32)
        denom = (tl.sqrt_rn(v * beta2 + one_minus_beta2 * g0 * g0) / bc2_sqrt + eps).to(tl.float64)
        if FAST:
            p_r = r / denom
        else:
            p_r = tl.where(mask, r / tl.where(mask, denom, 1.0), 0.0)  # no 0/0 in the padding lanes
        sr = _total(m * p_r, FAST)
        p_pr = _total(p * p_r, FAST)
        f_pr = _total(f * p_r, FAST)
        r_pr = _total(r * p_r, FAST)
    return ff, fr, rr, pr, sr, p_pr, f_pr, r_pr


@triton.jit(do_not_specialize=["n_blocks"])
def _terms_blocks_kernel(addr_p, addr_f, addr_r, addr_s1, addr_s2, numels, block_owner, block_index, block_fast,
                         step_addresses, partials, n_blocks, lr: tl.float64, weight_decay: tl.float64,
                         momentum: tl.float64, dampening: tl.float64, beta1_hi, beta1_lo, beta2_hi,
                         beta2_lo, beta2, one_minus_beta2, eps, weight_decay32,
                         P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, RULE: tl.constexpr, HAS_S1: tl.constexpr,
                         NESTEROV: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    owner = tl.load(block_owner + pid)
    step = tl.load(tl.load(step_addresses + owner).to(tl.pointer_type(tl.float32)))
    # sqrt(1 - beta2^t) in float32 exactly as the update's step kernel forms it
    t = tl.minimum(step + 1.0, 1073741824.0).to(tl.int32)
    beta1_d = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    beta2_d = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    bc2_sqrt = tl.sqrt_rn((1.0 - _int_power(beta2_d, t, BITS)).to(tl.float32))
    start = tl.load(block_index + pid) * BLOCK
    if tl.load(block_fast + pid) != 0:
        lanes = start + tl.arange(0, BLOCK)
        ff, fr, rr, pr, sr, p_pr, f_pr, r_pr = _block_sums(
            addr_p, addr_f, addr_r, addr_s1, addr_s2, owner, lanes, None, None, bc2_sqrt, beta2, one_minus_beta2, eps,
            weight_decay32, P_DTYPE, S_DTYPE, RULE, HAS_S1, True)
    else:
        tile = masked_offsets(start, BLOCK)
        mask = tile < tl.load(numels + owner)
        ff, fr, rr, pr, sr, p_pr, f_pr, r_pr = _block_sums(
            addr_p, addr_f, addr_r, addr_s1, addr_s2, owner, tile, mask, 0, bc2_sqrt, beta2, one_minus_beta2, eps,
            weight_decay32, P_DTYPE, S_DTYPE, RULE, HAS_S1, False)
    # the tensor's factors, float64 (the torch backend's formulas, docs/design.md table)
    if RULE == RULE_SGD:
        first = step == 0.0
        # float64 on both sides of every select (a bare float literal would make it float32)
        zero = pr * 0.0
        one = zero + 1.0
        if HAS_S1:
            if NESTEROV:  # D = (1 + mu) d_total + mu^2 b
                s_b = tl.where(first, zero, zero + momentum)
                s_d = one + momentum
            else:  # D = mu b + (1 - dampening) d_total; the first step D = d_total
                s_b = tl.where(first, zero, one)
                s_d = tl.where(first, one, one - dampening)
        else:
            s_b = zero
            s_d = one
        k0 = lr * (s_b * momentum * sr + s_d * weight_decay * pr)
        k1 = lr * s_d * fr
        k2 = lr * s_d * rr
    else:
        bc1 = 1.0 - _int_power(beta1_d, t, BITS)
        if RULE == RULE_ADAMW:
            decoupled = weight_decay
            l2 = 0.0
        else:
            decoupled = 0.0
            l2 = weight_decay
        k0 = lr * (decoupled * pr + (beta1_d * sr + (1.0 - beta1_d) * l2 * p_pr) / bc1)
        scale = (1.0 - beta1_d) / bc1
        k1 = lr * scale * f_pr
        k2 = lr * scale * r_pr
    tl.store(partials + AA * n_blocks + pid, ff)
    tl.store(partials + AB * n_blocks + pid, fr)
    tl.store(partials + BB * n_blocks + pid, rr)
    tl.store(partials + K0 * n_blocks + pid, k0)
    tl.store(partials + K1 * n_blocks + pid, k1)
    tl.store(partials + K2 * n_blocks + pid, k2)
    tl.store(partials + T0 * n_blocks + pid, pr)


@triton.jit(do_not_specialize=["n_blocks"])
def _finish_rows_kernel(partials, out, n_blocks, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[k] = the fixed-order sum of row k of partials[ROWS, n_blocks]."""
    for row in tl.static_range(ROWS):
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        start = 0
        while start < n_blocks:  # a while loop: see gramian._gramian_finish_kernel
            idx = start + tl.arange(0, BLOCK)
            acc += tl.load(partials + row * n_blocks + idx, mask=idx < n_blocks, other=0.0)
            start += BLOCK
        tl.store(out + row, tl.sum(acc, axis=0))


def terms(table: TensorTable, rows: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], param_dtype: torch.dtype,
          state_dtype: torch.dtype, rule: str, has_s1: bool, hp: StepHyper, device: torch.device) -> Tensor:
    """float64[TERMS_LEN] of one step table; ``rows`` the address rows of p, g_f, g_r, state 1 and
    state 2 (a dummy row where a state is absent)."""
    out = torch.empty(TERMS_LEN, dtype=torch.float64, device=device)
    n_blocks = table.n_blocks
    partials = torch.empty(TERMS_LEN * max(n_blocks, 1), dtype=torch.float64, device=device)
    if n_blocks > 0:
        b1_hi, b1_lo = split_beta(hp.beta1)
        b2_hi, b2_lo = split_beta(hp.beta2)
        _terms_blocks_kernel[(n_blocks,)](
            *rows, table.numels, table.block_owner, table.block_index, table.block_fast, table.scalar_addresses,
            partials, n_blocks, float(hp.lr), float(hp.weight_decay), float(hp.momentum), float(hp.dampening),
            b1_hi, b1_lo, b2_hi, b2_lo, float(hp.beta2), float(1.0 - hp.beta2),
            float(hp.eps), float(hp.weight_decay), P_DTYPE=tl_dtype(param_dtype), S_DTYPE=tl_dtype(state_dtype),
            RULE=RULE_CODE[rule], HAS_S1=has_s1, NESTEROV=bool(hp.nesterov), BITS=POWER_BITS, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    _finish_rows_kernel[(1,)](partials, out, n_blocks, ROWS=TERMS_LEN, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return out


# ---------------------------------------------------------------------------------- coefficients


@triton.jit
def _safe_div(num, den):
    positive = den > 0.0
    return tl.where(positive, num / tl.where(positive, den, 1.0), 0.0)


@triton.jit
def _solve(c, budget, k0, k1, k2):
    """max(0, (-budget - K0 - c*K1) / (c*K2)), 0 where c*K2 <= 0; a NaN stays NaN."""
    lam = _safe_div(-budget - k0 - c * k1, c * k2)
    return tl.where(lam < 0.0, 0.0, lam)


@triton.jit
def _norm_of(lam, aa, ab, bb):
    sq = aa + 2.0 * lam * ab + lam * lam * bb
    return tl.sqrt(tl.where(sq < 0.0, 0.0, sq))


@triton.jit
def _clip_of(lam, aa, ab, bb, max_norm, CLIP_EPS: tl.constexpr):
    clip = max_norm / (_norm_of(lam, aa, ab, bb) + tl.full(aa.shape, CLIP_EPS, tl.float64))
    return tl.where(clip > 1.0, 1.0, clip)


@triton.jit
def _update_space_coefficients_kernel(terms, found_inf, out, budget: tl.float64, max_norm: tl.float64,
                                      HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
                                      CLIP_EPS: tl.constexpr, ITERATIONS: tl.constexpr):
    aa = tl.load(terms + AA)
    ab = tl.load(terms + AB)
    bb = tl.load(terms + BB)
    k0 = tl.load(terms + K0)
    k1 = tl.load(terms + K1)
    k2 = tl.load(terms + K2)
    t0 = tl.load(terms + T0)
    finite = (tl.abs(aa) <= DBL_MAX) & (tl.abs(ab) <= DBL_MAX) & (tl.abs(bb) <= DBL_MAX)
    finite = finite & (tl.abs(k0) <= DBL_MAX) & (tl.abs(k1) <= DBL_MAX) & (tl.abs(k2) <= DBL_MAX)
    skip = ~(finite & (tl.abs(t0) <= DBL_MAX))
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf) != 0.0)
    one = tl.full(aa.shape, 1.0, tl.float64)
    lam = _solve(one, budget, k0, k1, k2)
    clip = one
    if HAS_CLIP:
        for _ in tl.static_range(ITERATIONS):
            clip = _clip_of(lam, aa, ab, bb, max_norm, CLIP_EPS)
            lam = _solve(clip, budget, k0, k1, k2)
        clip = _clip_of(lam, aa, ab, bb, max_norm, CLIP_EPS)
    dnorm = _norm_of(lam, aa, ab, bb)
    cos = _safe_div(ab, tl.sqrt(aa) * tl.sqrt(bb))
    ca = clip
    cb = lam * clip
    # lambda* is a lower bound: its float32 value is rounded up (the next float32 above a
    # non-negative value is its bit pattern plus one), never to nearest
    cb32 = cb.to(tl.float32)
    up = (cb32.to(tl.float64) < cb) & (cb32 >= 0.0)
    cb32 = tl.where(up, (cb32.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True), cb32)
    skip = skip | ~((tl.abs(ca) <= FLT_MAX) & (tl.abs(cb32) <= FLT_MAX))
    tl.store(out + CA, tl.where(skip, 1.0, ca).to(tl.float32))
    tl.store(out + CB, tl.where(skip, 0.0, cb32))
    tl.store(out + SKIP, tl.where(skip, 1.0, 0.0).to(tl.float32))
    tl.store(out + LAM, lam.to(tl.float32))
    tl.store(out + CLIP, clip.to(tl.float32))
    tl.store(out + COS, cos.to(tl.float32))
    tl.store(out + DNORM, dnorm.to(tl.float32))
    tl.store(out + A, one.to(tl.float32))


def coefficients(terms: Tensor, cfg: SurgeryConfig, budget: float, found_inf: Tensor | None) -> Tensor:
    """float32[COEF_LEN] on ``terms``' device from the global float64[TERMS_LEN]."""
    if terms.numel() != TERMS_LEN:
        raise ValueError(f"terms must have {TERMS_LEN} elements, got shape {tuple(terms.shape)}")
    device = terms.device
    terms = aligned(terms.to(torch.float64).contiguous())
    out = torch.empty(COEF_LEN, dtype=torch.float32, device=device)
    inf = terms if found_inf is None else aligned(found_inf.to(device=device, dtype=torch.float32).reshape(1))
    max_norm = 1.0 if cfg.max_norm is None else float(cfg.max_norm)
    _update_space_coefficients_kernel[(1,)](
        terms, inf, out, float(budget), max_norm, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=cfg.max_norm is not None, CLIP_EPS=CLIP_EPS, ITERATIONS=CLIP_ITERATIONS, num_warps=1)
    return out
