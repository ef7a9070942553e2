"""What the tests share: the axes of the contract table, the tolerance table, tensor makers.

The one module the tests share code through (no test module imports another). Its parts:

- the axes of the contract table (tests/test_contract.py): backends, storage dtypes, sizes, and
  the configurations generated from the registries of surgery rules and base update rules;
- the tolerance table, each entry derived from the unit roundoff of the dtypes involved and the
  error bound of the operation (docs/design.md, Kernel contract);
- tensor makers: random lists, conflicting gradient pairs, pairs at the edges of the float range;
- a small model and its two losses for optimizer-level tests.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch import Tensor

from eupmu_kernels import dispatch
from eupmu_kernels import reference as ref
from eupmu_kernels.contract import StepHyper
from eupmu_kernels.rules import RULES
from eupmu_kernels.surgery import SURGERY_RULES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ------------------------------------------------------------------------------ sizes and dtypes

# Awkward sizes: a singleton, an odd size below one block, one past a power of two (a full block
# and a masked tail), and many small tensors plus one large one (many launches' worth of metadata).
SIZE_CASES = {
    "one": [(1,)],
    "seven": [(7,)],
    "4097": [(4097,)],
    "many_small_plus_large": [(3 + (i * 7) % 29,) for i in range(50)] + [(280, 250)],
}
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the torch backend also takes float64 storage (docs/design.md, Kernel contract)
TABLE_DTYPES = STORAGE_DTYPES + (torch.float64,)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ backends

def _unavailable_reason(name: str) -> str | None:
    """Why a backend cannot run here at all, or None. Only a missing build or package counts: the
    Triton interpreter runs CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU),
    and EUPMU_REQUIRE_EXT=1 turns a missing extension into a failure instead of a skip."""
    try:
        dispatch.get_backend(name, DEVICE, torch.float32)
    except dispatch.BackendUnavailableError as err:
        if name == "native" and os.environ.get("EUPMU_REQUIRE_EXT") == "1":
            return None
        return str(err)
    return None


BACKEND_NAMES = ("torch", "triton", "native")
UNAVAILABLE = {name: _unavailable_reason(name) for name in BACKEND_NAMES}
# The Triton interpreter executes every program instance in Python: about a second for the
# many-tensor case, tens of milliseconds for the others. The table runs its small sizes in every
# combination and the many-tensor case in the combinations the old per-backend tests ran.
INTERPRETED = {"triton": DEVICE.type == "cpu"}


def backend_param(name: str, *values, id: str | None = None, threads: int | None = None):  # noqa: A002
    """pytest.param for one backend's case, skipped only when the backend cannot run here.

    Intra-op threads: two for the compiled CPU kernels (their parallel split needs two to be
    exercised), one otherwise (the interpreter and the torch ops on these sizes gain nothing from more
    on a shared machine); ``threads`` overrides it."""
    reason = UNAVAILABLE[name]
    if threads is None:
        threads = 1 if INTERPRETED.get(name) or name == "torch" else 2
    marks = [pytest.mark.threads(threads)]
    marks += [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, *values, id=id or name, marks=marks)


def get_backend(name: str, dtype: torch.dtype = torch.float32):
    return dispatch.get_backend(name, DEVICE, dtype)


def backend_supports(name: str, dtype: torch.dtype) -> bool:
    """Whether a backend takes this storage dtype (a contract property, not an availability question:
    only the torch backend takes float64). Unavailable backends count as supporting the storage
    dtypes, so that their cases appear in the table, skipped."""
    if UNAVAILABLE[name]:
        return dtype in STORAGE_DTYPES
    return get_backend(name).supports(DEVICE, dtype)


# ------------------------------------------------------------------------------ tolerance table
#
# u(dtype): the unit roundoff, half the spacing of the numbers in [1, 2) -- 2^-53 (float64),
# 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16). A value rounded to nearest is within u of
# itself, relatively; a truncated one within 2u (the Triton interpreter truncates float32 to
# bfloat16 stores), so one store into a storage dtype is budgeted STORE = 2u.

def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2.0


U64 = unit_roundoff(torch.float64)
U32 = unit_roundoff(torch.float32)


def store_error(dtype: torch.dtype) -> float:
    """One store into ``dtype`` (rounded or truncated): 2u relative, for normal numbers."""
    return 2.0 * unit_roundoff(dtype)


def subnormal_spacing(dtype: torch.dtype) -> float:
    """Below the smallest normal number the spacing is fixed (2^-149 for float32, 2^-24 for float16,
    2^-133 for bfloat16): a stored value that small is off by at most one spacing, whatever its
    relative error."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def gamma(n: int, u: float = U64) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n roundings in a row (and of a sum of
    n + 1 terms in any order, relative to the sum of their magnitudes)."""
    return n * u / (1.0 - n * u)


def gramian_bound(n: int) -> float:
    """|G_computed - G_reference| <= gramian_bound(n) * sum |x_i y_i| per entry, n elements.

    Products of two float32 (or narrower) values are exact in float64 (2 x 24 <= 53 significant
    bits); float64 storage rounds each product once. Any summation order of n float64 terms errs
    by at most gamma_{n-1} of the sum of magnitudes; the float64 reference errs as much in its own
    order, so the two differ by at most 2 gamma_{n+1}."""
    return 2.0 * gamma(n + 1)


# Coefficient stage: every slot is a few float64 operations on the Gramian (error ~10 u64 times
# the cancellation of the Gramian cases in the table, < 1e3: far below u32) followed by one
# rounding to float32 (u32). Two u32 bound it with the float64 part to spare.
COEF_RTOL = 2.0 * U32
# A slot below float32's smallest normal (the norm of a gradient of 1e-40) is off by one subnormal spacing.
COEF_ATOL = subnormal_spacing(torch.float32)

# Combine (d = ca g_f + cb g_r in float32 math, one store): ca and cb carry the coefficient stage's
# 2 u32 each, the product and the sum one float32 rounding each, then one store into the storage
# dtype. Per element: |d_computed - d| <= STORE * |d| + 4 u32 * (|ca g_f| + |cb g_r|) + one subnormal
# spacing of the storage dtype (float16 results below 6.1e-5 are stored with a fixed spacing of 6e-8).
COMBINE_U32_ROUNDINGS = 4

# Fused step: per element the longest chain of float32 operations is Adam's -- the direction (4,
# as in combine), weight decay (2), first moment (2), second moment (3), the bias corrections (2),
# square root, epsilon, division, learning rate and the final subtraction (5): 18 roundings of u32
# each, first order. Norm-wise over all elements (cancellation within single elements, e.g. of
# momentum against a fresh gradient, is rare and averages out over a vector) the computed
# parameters, moments and buffers then lie within STORE of their dtype plus 18 u32 of the float64
# reference's, and for float32/float64 parameters the update theta_{t+1} - theta_t itself (which
# the store into the parameter would swamp for narrow dtypes) within 18 u32 plus the parameter
# store relative to the update's size.
STEP_U32_ROUNDINGS = 18


def step_rtol(dtype: torch.dtype) -> float:
    """Norm-wise relative tolerance of a tensor stored in ``dtype`` after one fused step."""
    return store_error(dtype) + STEP_U32_ROUNDINGS * U32


# ------------------------------------------------------------------------------ comparisons


def flat64(tensors) -> Tensor:
    """All tensors flattened into one float64 vector on the host."""
    return torch.cat([t.detach().cpu().reshape(-1).to(torch.float64) for t in tensors])


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float, what: str = "", atol: float = 0.0) -> None:
    """Relative error measured against the norm of the expected vector (robust for tiny entries):
    ||actual - expected|| <= rtol ||expected|| + atol sqrt(n), atol an absolute error per element."""
    actual = actual.detach().cpu().to(torch.float64).reshape(-1)
    expected = expected.detach().cpu().to(torch.float64).reshape(-1)
    scale = expected.norm().clamp_min(1e-30)
    err = ((actual - expected).norm() - atol * expected.numel() ** 0.5).clamp_min(0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor, what: str = "") -> None:
    """Element-wise |actual - expected| <= bound (all float64 on the host)."""
    actual = actual.detach().cpu().to(torch.float64).reshape(-1)
    expected = expected.detach().cpu().to(torch.float64).reshape(-1)
    err = (actual - expected).abs()
    bad = err > bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements out of bounds, e.g. #{i}: "
                             f"got {actual[i].item():.9g}, want {expected[i].item():.9g}, "
                             f"error {err[i].item():.3e} > bound {bound[i].item():.3e}")


# ------------------------------------------------------------------------------ tensors


def make_tensors(shapes, dtype=torch.float32, seed=0, scale=1.0, device=None) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]
    return out if device is None else [t.to(device) for t in out]


def conflicting_pair(shapes, dtype, seed: int, device=None) -> tuple[list[Tensor], list[Tensor]]:
    """(g_f, g_r) with <g_f, g_r> < 0, so that surgery has something to do."""
    g_f = make_tensors(shapes, dtype, seed=seed)
    noise = make_tensors(shapes, dtype, seed=seed + 100)
    g_r = [(-0.7 * f.double() + 0.5 * r.double()).to(dtype) for f, r in zip(g_f, noise)]
    if device is not None:
        g_f, g_r = [t.to(device) for t in g_f], [t.to(device) for t in g_r]
    return g_f, g_r


# Gradient pairs at the edges of the float32/bfloat16/float16 range, and their float64 truth: every
# backend must give the Gramian and lambda of the stored values to float64 accuracy, whether the
# element products are far below the smallest normal float32 (1.2e-38) or their sums far above the
# largest (3.4e38).
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


def range_truth(f: list[Tensor], r: list[Tensor]) -> dict[str, float]:
    """Gramian, lambda (tolerance 0) and cosine of the stored values, in float64."""
    x = torch.cat([t.reshape(-1).double() for t in f])
    y = torch.cat([t.reshape(-1).double() for t in r])
    aa, ab, bb = float(x @ x), float(x @ y), float(y @ y)
    return {"aa": aa, "ab": ab, "bb": bb, "lam": max(0.0, -ab / bb), "cos": ab / (aa ** 0.5 * bb ** 0.5)}


# ------------------------------------------------------------------------------ rule configurations
#
# Surgery rules come straight from their registry: a rule registered in eupmu_kernels.surgery with
# a case in reference.pair_coefficients is in every row of the table below. Base rules come from
# theirs, each with the hyperparameter variants that take different kernel paths; a rule without
# listed variants runs with its defaults.

SURGERY_NAMES = tuple(SURGERY_RULES)
SURGERY_SETTINGS = dict(tolerance=0.05, alpha=0.3)  # a tolerance that leaves slack, a GradDiff weight

RULE_VARIANTS: dict[str, dict[str, dict]] = {
    "sgd": {
        "plain": dict(lr=0.05),
        "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
        "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    },
    "adam": {"l2": dict(lr=0.05, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)},
    "adamw": {
        "decoupled": dict(lr=0.05, weight_decay=0.1),
        "betas": dict(lr=0.02, betas=(0.6, 0.9), eps=1e-6, weight_decay=0.0),
    },
}


def rule_configs() -> dict[str, tuple[str, dict]]:
    """{id: (rule, hyperparameters as EUPMU takes them)} for every registered base rule."""
    out = {}
    for rule in RULES:
        for variant, hp in RULE_VARIANTS.get(rule, {"defaults": dict(lr=0.05)}).items():
            out[f"{rule}-{variant}"] = (rule, hp)
    return out


RULE_CONFIGS = rule_configs()


def step_hyper(rule: str, hp: dict) -> StepHyper:
    """The launch's StepHyper, made by the rule's own unit from a param group."""
    unit = RULES[rule]
    group = {**unit.default_hyperparameters(), **hp}
    return unit.step_hyper(group)


def reference_rule_kwargs(rule: str, hp: StepHyper) -> dict:
    """The StepHyper fields the float64 reference of ``rule`` takes (``reference.<rule>_step``)."""
    fn = getattr(ref, f"{rule}_step")
    return {name: getattr(hp, name) for name in inspect.signature(fn).parameters if hasattr(hp, name)}


# ------------------------------------------------------------------------------ a small model

def make_model(dtype=torch.float32, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def batch(step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x_f = torch.randn(8, 6, generator=gen, dtype=dtype)
    x_r = torch.randn(16, 6, generator=gen, dtype=dtype)
    y_f = torch.randint(0, 3, (8,), generator=gen)
    y_r = torch.randint(0, 3, (16,), generator=gen)
    return x_f, y_f, x_r, y_r


def losses(model, step, dtype=torch.float32):
    """(forget, retain): gradient ascent on the forget batch, cross-entropy on the retain batch."""
    x_f, y_f, x_r, y_r = batch(step, dtype)
    ce = torch.nn.functional.cross_entropy
    return -ce(model(x_f), y_f), ce(model(x_r), y_r)


def explicit_step(model, opt, step, dtype=torch.float32):
    opt.zero_grad()
    forget, retain = losses(model, step, dtype)
    retain.backward()
    opt.stash_retain_grad()
    forget.backward()
    opt.step()

