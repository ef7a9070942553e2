"""The kernel contract (docs/design.md, Kernel contract) as one table, every backend against the float64 reference.

Rows: each entry point of ``eupmu_kernels.ops`` (Gramian, coefficient stage, combine, the three
together), each backend's fused update ``step_`` and the optimizer's step. Columns: backend x
storage dtype x size, and the rules from their registries -- every surgery rule registered in
``eupmu_kernels.surgery`` and every base rule in ``eupmu_kernels.rules`` (with the variants of
tests/fixtures.py). Tolerances come from the tolerance table in tests/fixtures.py.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from fixtures import (
    BACKEND_NAMES,
    COEF_ATOL,
    COEF_RTOL,
    COMBINE_U32_ROUNDINGS,
    DEVICE,
    INTERPRETED,
    RULE_CONFIGS,
    SIZE_CASES,
    STEP_U32_ROUNDINGS,
    STORAGE_DTYPES,
    SURGERY_NAMES,
    SURGERY_SETTINGS,
    TABLE_DTYPES,
    UNAVAILABLE,
    U32,
    assert_close_rel,
    assert_within,
    backend_param,
    backend_supports,
    conflicting_pair,
    dtype_id,
    flat64,
    get_backend,
    gramian_bound,
    huge_pair,
    make_tensors,
    range_truth,
    reference_rule_kwargs,
    step_hyper,
    step_rtol,
    store_error,
    subnormal_spacing,
    tiny_forget_pair,
    wide_range_pair,
)
from torch import Tensor

from eupmu_kernels import EUPMU, ops
from eupmu_kernels import reference as ref
from eupmu_kernels.contract import COEF_LEN, COEF_SLOTS, TERM_SLOTS, TERMS_LEN, RuleStateLists
from eupmu_kernels.rules import RULES

CA, CB, SKIP = (COEF_SLOTS.index(s) for s in ("ca", "cb", "skip"))

pytestmark = [
    # the Triton interpreter computes with numpy, which warns about the inf/nan the guards are tested with
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def table(extra: dict[str, dict] | None = None, *, storage: bool = False, light=None, thin=None) -> list:
    """The table's rows for one entry point: backend x storage dtype (x state dtype) x size x the entry
    point's own axes (``extra``: {axis: {id: value}}), only the combinations a backend takes by contract
    (only the torch backend takes float64); a backend that cannot run here is in the table, skipped.

    ``light(*values)``: for the Triton interpreter's many-tensor case (about a second each), the
    combinations worth that cost; the small sizes run every combination. ``thin(name, *values)``: the
    combinations of an axis whose kernel path does not depend on the others, for every backend."""
    extra = extra or {}
    rows = []
    for name in BACKEND_NAMES:
        for dtype in TABLE_DTYPES:
            if not backend_supports(name, dtype):
                continue
            narrow = dtype in (torch.float16, torch.bfloat16)
            for state_dtype in ([dtype] + ([torch.float32] if narrow else [])) if storage else [None]:
                for size in SIZE_CASES:
                    head = [dtype] + ([state_dtype] if storage else []) + [size]
                    head_id = [dtype_id(dtype)] + ([f"state_{dtype_id(state_dtype)}"] if storage else []) + [size]
                    for combo in itertools.product(*(d.items() for d in extra.values())):
                        values = head + [v for _, v in combo]
                        heavy = INTERPRETED.get(name) and size == "many_small_plus_large"
                        if heavy and light is not None and not light(*values):
                            continue
                        if thin is not None and not thin(name, *values):
                            continue
                        rows.append(backend_param(name, *values, id="-".join([name] + head_id + [k for k, _ in combo])))
    return rows


def backends() -> list:
    return [backend_param(name) for name in BACKEND_NAMES]


# ---------------------------------------------------------------------------------------- Gramian


@pytest.mark.parametrize("backend, dtype, size", table())
def test_gramian(backend, dtype, size):
    """float64[3] of the stored values to float64 accuracy; (<a,a>, 0, 0) without b; bit-identical when repeated."""
    shapes = SIZE_CASES[size]
    a = make_tensors(shapes, dtype, seed=1, device=DEVICE)
    b = make_tensors(shapes, dtype, seed=2, device=DEVICE)
    g = ops.gramian(a, b, backend=backend)
    assert g.dtype == torch.float64 and g.shape == (3,) and g.device.type == DEVICE.type
    x, y = flat64(a), flat64(b)
    expected = ref.gramian(x, y)
    magnitude = torch.stack([x @ x, x.abs() @ y.abs(), y @ y])
    assert_within(g, expected, gramian_bound(x.numel()) * magnitude, f"gramian {backend} {dtype} {size}")
    assert torch.equal(g, ops.gramian(a, b, backend=backend)), "not deterministic"

    alone = ops.gramian(a, backend=backend).cpu()
    assert alone[1].item() == 0.0 and alone[2].item() == 0.0
    assert_within(alone[:1], expected[:1], gramian_bound(x.numel()) * magnitude[:1], "gramian without b")


@pytest.mark.parametrize("where", ["small tensor", "full block", "tail of a block"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("backend", backends())
def test_nonfinite_input_gives_nonfinite_gramian_and_a_skipped_surgery(backend, bad, where):
    shapes = [(7,), (3, 5), (4097,)]
    index = {"small tensor": (1, 4), "full block": (2, 100), "tail of a block": (2, 4096)}[where]
    g_f = make_tensors(shapes, seed=5, device=DEVICE)
    g_r = make_tensors(shapes, seed=6, device=DEVICE)
    g_r[index[0]].view(-1)[index[1]] = bad
    assert not torch.isfinite(ops.gramian(g_f, g_r, backend=backend)).all()
    before = [t.clone() for t in g_f]
    res = ops.surgery_(g_f, g_r, backend=backend)
    assert res.skipped.item() == 1.0
    assert all(torch.equal(x, y) for x, y in zip(g_f, before)), "a skipped surgery wrote g_f"
    g_f[index[0]].view(-1)[index[1]] = bad
    assert not torch.isfinite(ops.gramian(g_f, backend=backend)).all()


@pytest.mark.parametrize("backend", backends())
def test_empty_tensors_add_nothing(backend):
    a = [t.to(DEVICE) for t in (torch.empty(0), torch.ones(3), torch.empty(2, 0))]
    b = [t.to(DEVICE) for t in (torch.empty(0), torch.full((3,), 2.0), torch.empty(2, 0))]
    assert ops.gramian(a, b, backend=backend).cpu().tolist() == [3.0, 6.0, 12.0]
    assert ops.gramian(a[:1], b[:1], backend=backend).cpu().tolist() == [0.0, 0.0, 0.0]


# The numerical range: finite inputs whose element products lie far below the smallest normal float32
# or whose sums lie far above the largest must still give the stored values' Gramian to float64
# accuracy, and lambda and cos to the one float32 rounding of the coefficient slot plus what the
# Gramian's own (float64) error moves them by (float32 accumulation fails these by orders of magnitude).

RANGE_CASES = {
    **{f"tiny_forget-{dtype_id(d)}-norm_r_{n:g}": (tiny_forget_pair, d, n) for d in (torch.float32, torch.bfloat16)
       for n in (1.0, 1e-5)},
    **{f"huge-{dtype_id(d)}": (huge_pair, d, None) for d in (torch.float32, torch.bfloat16)},
    **{f"wide-{dtype_id(d)}": (wide_range_pair, d, None) for d in STORAGE_DTYPES},
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
@pytest.mark.parametrize("backend", backends())
def test_gramian_and_lambda_over_the_whole_float_range(backend, case):
    make, dtype, arg = RANGE_CASES[case]
    f, r = make(dtype) if arg is None else make(dtype, arg)
    want = range_truth(f, r)
    f, r = [t.to(DEVICE) for t in f], [t.to(DEVICE) for t in r]
    gram = ops.gramian(f, r, backend=backend).cpu()
    x, y = flat64(f), flat64(r)
    magnitude = torch.stack([x @ x, x.abs() @ y.abs(), y @ y])
    bound = gramian_bound(x.numel()) * magnitude
    assert_within(gram, torch.tensor([want["aa"], want["ab"], want["bb"]], dtype=torch.float64), bound, case)
    gram_rel = float((bound / torch.tensor([want["aa"], abs(want["ab"]), want["bb"]])).max())
    coef = ops.coefficient_vector(gram.to(DEVICE), method="ungrad", backend=backend).cpu().double()
    slot = {name: coef[i].item() for i, name in enumerate(COEF_SLOTS)}
    assert slot["skip"] == 0.0, case
    # lambda = -ab/bb and cos = ab/sqrt(aa bb): the Gramian's relative error twice, then one float32 rounding
    rtol = COEF_RTOL + 2.0 * gram_rel
    for name in ("lam", "cb"):
        assert slot[name] == pytest.approx(want["lam"], rel=rtol), (case, name)
    assert slot["cos"] == pytest.approx(want["cos"], rel=rtol), case
    if dtype == torch.float32 and make is tiny_forget_pair:  # g_f = -1e-30 g_r: lambda = 1e-30 up to rounding g_f
        assert slot["lam"] == pytest.approx(1e-30, rel=1e-6)
    if make is huge_pair:  # the combined direction is the reference's, and finite
        out = [t.clone() for t in f]
        ops.combine_(out, r, coef.float().to(DEVICE), backend=backend)
        truth = torch.tensor([want["aa"], want["ab"], want["bb"]], dtype=torch.float64)
        check_combined(out, f, r, *ref.pair_coefficients(truth, "ungrad"), 1.0, dtype, case)


# ------------------------------------------------------------------------------ coefficient stage

GRAMS = {
    "conflict": [4.0, -2.5, 2.0],
    "agree": [4.0, 2.5, 2.0],
    "zero retain": [4.0, 0.0, 0.0],
    "zero retain, stray dot": [4.0, -0.5, 0.0],
    "zero forget": [0.0, 0.0, 2.0],
    "both zero": [0.0, 0.0, 0.0],
    "large": [3e30, -1e30, 5e29],
    # float64 Gramians beyond the float32 range (finite float32 gradients can have them)
    "beyond float32": [1e50, -5e49, 1e50],
    "tiny": [1e-80, -1e-50, 1e-20],  # |g_f| = 1e-40, |g_r| = 1e-10: lambda = 1e-30, cos = -1
    # |g_f| = 1e40, |g_r| = 1e-40, cos = -1: lambda = 1e80 does not fit the float32 update: skipped
    "coefficient overflow": [1e80, -1.0, 1e-80],
}
NONFINITE_GRAMS = [[float("inf"), 1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0, -float("inf")]]
FLOAT32_MAX = torch.finfo(torch.float32).max


def reference_slots(gram: list[float], method: str, max_norm: float | None, inv: float, found_inf: bool) -> dict:
    """The float64 reference of every coefficient slot for the (unscaled) Gramian ``gram`` of gradients that
    reach the coefficient stage scaled by 1/inv."""
    g = torch.tensor(gram, dtype=torch.float64)
    aa, ab, bb = (float(v) for v in g)
    a, b = ref.pair_coefficients(g, method, SURGERY_SETTINGS["tolerance"], SURGERY_SETTINGS["alpha"])
    dnorm = ref.combined_norm(g, a, b)
    clip = ref.clip_factor(dnorm, max_norm)
    cos = ab / (aa ** 0.5 * bb ** 0.5) if aa > 0 and bb > 0 else 0.0
    ca, cb = a * clip * inv, b * clip * inv
    skip = found_inf or abs(ca) > FLOAT32_MAX or abs(cb) > FLOAT32_MAX
    if skip:
        ca, cb = 1.0, 0.0
    return dict(ca=ca, cb=cb, skip=float(skip), lam=b, clip=clip, cos=cos, dnorm=dnorm, a=a)


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no_clip", "clip"])
@pytest.mark.parametrize("method", SURGERY_NAMES)
@pytest.mark.parametrize("backend", backends())
def test_coefficient_vector(backend, method, max_norm, scaled):
    """Every slot of every registered rule's coefficient vector, float64 and float32 Gramians, with a
    GradScaler's 1/scale (a power of two: exact) and found_inf."""
    inv = 1.0 / 1024 if scaled else 1.0
    inv_scale = torch.tensor(inv, device=DEVICE) if scaled else None
    for name, gram in GRAMS.items():
        fits_float32 = all(v == 0.0 or 1e-30 < abs(v) < 1e31 for v in gram)  # also once scaled by 2^20
        gram_dtypes = [torch.float64] + ([torch.float32] if fits_float32 else [])
        for gram_dtype in gram_dtypes:
            g = torch.tensor(gram, dtype=torch.float64) / (inv * inv)
            for found_inf in (None, 0.0, 1.0):
                got = ops.coefficient_vector(g.to(DEVICE, gram_dtype), method=method, max_norm=max_norm,
                                             inv_scale=inv_scale, backend=backend, **SURGERY_SETTINGS,
                                             found_inf=None if found_inf is None else torch.tensor(found_inf,
                                                                                                   device=DEVICE))
                assert got.shape == (COEF_LEN,) and got.dtype == torch.float32 and got.device.type == DEVICE.type
                want = reference_slots(gram, method, max_norm, inv, found_inf == 1.0)
                got = got.cpu().double()
                for i, slot in enumerate(COEF_SLOTS):
                    want32 = torch.tensor(want[slot], dtype=torch.float64).float().item()  # inf beyond float32
                    assert got[i].item() == pytest.approx(want32, rel=COEF_RTOL, abs=COEF_ATOL), \
                        (name, gram_dtype, found_inf, slot, got.tolist())


@pytest.mark.parametrize("method", SURGERY_NAMES)
@pytest.mark.parametrize("backend", backends())
def test_nonfinite_gramian_sets_skip(backend, method):
    for gram in NONFINITE_GRAMS:
        coef = ops.coefficient_vector(torch.tensor(gram, dtype=torch.float64, device=DEVICE), method=method,
                                      max_norm=1.0, backend=backend).cpu()
        assert (coef[CA].item(), coef[CB].item(), coef[SKIP].item()) == (1.0, 0.0, 1.0), (gram, coef)


# ---------------------------------------------------------------------------------- combine


def check_combined(out: list[Tensor], g_f: list[Tensor], g_r: list[Tensor] | None, a: float, b: float, clip: float,
                   dtype: torch.dtype, what: str) -> None:
    """|d_computed - d| <= STORE |d| + 4 u32 (|ca g_f| + |cb g_r|) element-wise (tests/fixtures.py)."""
    f = flat64(g_f)
    r = torch.zeros_like(f) if g_r is None else flat64(g_r)
    d = clip * (a * f + b * r)
    terms = clip * (abs(a) * f.abs() + abs(b) * r.abs())
    bound = store_error(dtype) * d.abs() + COMBINE_U32_ROUNDINGS * U32 * terms + subnormal_spacing(dtype)
    assert torch.isfinite(flat64(out)).all(), what
    assert_within(flat64(out), d, bound * (1 + 1e-6), what)


@pytest.mark.parametrize("backend, dtype, size, method, clipped", table(
    {"method": {m: m for m in SURGERY_NAMES}, "clip": {"no_clip": False, "clip": True}},
    light=lambda dtype, size, method, clipped: clipped))
def test_surgery(backend, dtype, size, method, clipped):
    """ops.surgery_ (Gramian, coefficients, combine) for each registered rule; the one-gradient rule
    ("none", implicit mode) combines without g_r. g_r is only read."""
    shapes = SIZE_CASES[size]
    g_f, g_r = conflicting_pair(shapes, dtype, seed=10, device=DEVICE)
    one_gradient = method == "none"
    stored_f = [t.clone() for t in g_f]
    f64 = flat64(g_f)
    g64 = ref.gramian(f64, torch.zeros_like(f64) if one_gradient else flat64(g_r))
    a, b = ref.pair_coefficients(g64, method, SURGERY_SETTINGS["tolerance"], SURGERY_SETTINGS["alpha"])
    natural = ref.combined_norm(g64, a, b)
    max_norm = 0.5 * natural if clipped and natural > 0 else None
    clip = ref.clip_factor(natural, max_norm)
    g_r_before = [t.clone() for t in g_r]
    if one_gradient:
        coef = ops.coefficient_vector(ops.gramian(g_f, backend=backend), method="none", max_norm=max_norm,
                                      backend=backend)
        ops.combine_(g_f, None, coef, backend=backend)
        skipped = coef[SKIP]
    else:
        res = ops.surgery_(g_f, g_r, method=method, max_norm=max_norm, backend=backend, **SURGERY_SETTINGS)
        skipped = res.skipped
    assert skipped.item() == 0.0
    check_combined(g_f, stored_f, None if one_gradient else g_r, a, b, clip, dtype,
                   f"{method} {backend} {dtype} {size}")
    assert all(torch.equal(x, y) for x, y in zip(g_r, g_r_before)), "g_r was written"


# ---------------------------------------------------------------------------------- fused step


def initial_state(rule: str, hp, params: list[Tensor], state_dtype: torch.dtype, seed: int,
                  steps=(0, 7, 9999)) -> RuleStateLists:
    """Step counts 0, 7 and 9999 in turn (first steps, bias corrections far from 1 and near it), with
    non-trivial moments and buffers in ``state_dtype`` -- zero at step 0, as the optimizer creates them."""
    gen = torch.Generator().manual_seed(seed)
    unit = RULES[rule]
    group = {"momentum": hp.momentum}
    st = RuleStateLists(step=[torch.tensor(float(steps[i % len(steps)]), device=DEVICE) for i in range(len(params))])
    for key in unit.active_state_keys(group) if rule == "sgd" else unit.state_keys:
        positive = key == "exp_avg_sq"
        values = []
        for i, p in enumerate(params):
            x = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (st.step[i].item() > 0)
            values.append(((x.abs() * 0.01) if positive else (x * 0.1)).to(state_dtype).to(DEVICE))
        setattr(st, key, values)
    return st


def state_keys(st: RuleStateLists) -> list[str]:
    return [k for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if getattr(st, k)]


def reference_step(rule: str, hp, params: list[Tensor], d: list[Tensor], st: RuleStateLists):
    """The float64 reference, tensor by tensor, from the stored parameters and state: (params, {key: state})."""
    kwargs = reference_rule_kwargs(rule, hp)
    new_p, new_state = [], {k: [] for k in state_keys(st)}
    for i, p in enumerate(params):
        step = int(st.step[i].item())
        rs = ref.RuleState(step=step)
        for key in new_state:
            if key != "momentum_buffer" or step > 0:  # torch.optim's first SGD step starts the buffer at d
                setattr(rs, key, flat64([getattr(st, key)[i]]))
        new_p.append(getattr(ref, f"{rule}_step")(flat64([p]), d[i], rs, **kwargs))
        for key in new_state:
            new_state[key].append(getattr(rs, key))
    return new_p, new_state


@pytest.mark.parametrize("backend, dtype, state_dtype, size, config, with_retain", table(
    {"config": {c: c for c in RULE_CONFIGS}, "retain": {"g_f_and_g_r": True, "g_f_only": False}}, storage=True,
    light=lambda dtype, state_dtype, size, config, with_retain: with_retain and state_dtype == torch.float32,
    # the launch without g_r: one small size (below a block) and the many-tensor case are its paths
    thin=lambda name, dtype, state_dtype, size, config, with_retain: with_retain or size in (
        ("seven",) if INTERPRETED.get(name) else ("seven", "many_small_plus_large"))))
def test_step(backend, dtype, state_dtype, size, config, with_retain):
    """backend.step_ (d = ca g_f + cb g_r, then the base rule) against the reference, two launches in a row."""
    rule, options = RULE_CONFIGS[config]
    hp = step_hyper(rule, options)
    kernels = get_backend(backend, dtype)
    shapes = SIZE_CASES[size]
    params = make_tensors(shapes, dtype, seed=20, device=DEVICE)
    g_f = make_tensors(shapes, dtype, seed=21, device=DEVICE)
    g_r = make_tensors(shapes, dtype, seed=22, device=DEVICE) if with_retain else None
    st = initial_state(rule, hp, params, state_dtype, seed=23)
    ca, cb = 0.9, (-0.3 if with_retain else 0.0)
    coef = torch.zeros(COEF_LEN, dtype=torch.float32)
    coef[CA], coef[CB] = ca, cb
    coef = coef.to(DEVICE)
    d = [ca * x.double().cpu().reshape(-1) for x in g_f]
    if with_retain:
        d = [x + cb * y.double().cpu().reshape(-1) for x, y in zip(d, g_r)]
    for k in range(2):
        before = flat64(params)
        steps_before = [s.item() for s in st.step]
        want_p, want_state = reference_step(rule, hp, params, d, st)
        kernels.step_(rule, params, g_f, g_r, st, coef, hp)
        what = f"{config} {backend} {dtype}/{state_dtype} {size} launch {k}"
        want_p = torch.cat(want_p)
        assert_close_rel(flat64(params), want_p, step_rtol(dtype), what + " params", subnormal_spacing(dtype))
        if dtype in (torch.float32, torch.float64):  # the update itself, not only the parameter it lands on
            moved = want_p - before
            rtol = STEP_U32_ROUNDINGS * U32 + store_error(dtype) * (want_p.norm() / moved.norm()).item()
            assert_close_rel(flat64(params) - before, moved, rtol, what + " update")
        for key, values in want_state.items():
            assert_close_rel(flat64(getattr(st, key)), torch.cat(values), step_rtol(state_dtype), f"{what} {key}",
                             subnormal_spacing(state_dtype))
        assert [s.item() for s in st.step] == [s + 1 for s in steps_before], what


@pytest.mark.parametrize("config", list(RULE_CONFIGS))
@pytest.mark.parametrize("backend", backends())
def test_skipped_step_changes_nothing(backend, config):
    """A non-finite Gramian or GradScaler's found_inf: parameters, state and step counts stay, bit for bit."""
    rule, options = RULE_CONFIGS[config]
    hp = step_hyper(rule, options)
    kernels = get_backend(backend)
    shapes = [(7,), (4097,)]
    g_f, g_r = conflicting_pair(shapes, torch.float32, seed=50, device=DEVICE)
    params = make_tensors(shapes, seed=51, device=DEVICE)
    st = initial_state(rule, hp, params, torch.float32, seed=52)
    st.step = [torch.tensor(2.0, device=DEVICE) for _ in params]
    tensors = lambda: params + st.step + st.momentum_buffer + st.exp_avg + st.exp_avg_sq  # noqa: E731
    before = [t.clone() for t in tensors()]
    g_f[1][4096] = float("inf")
    coef = ops.coefficient_vector(ops.gramian(g_f, g_r, backend=backend), backend=backend)
    kernels.step_(rule, params, g_f, g_r, st, coef, hp)
    assert all(torch.equal(x, y) for x, y in zip(before, tensors())), "non-finite Gramian"
    g_f[1][4096] = 1.0
    coef = ops.coefficient_vector(ops.gramian(g_f, g_r, backend=backend), backend=backend,
                                  found_inf=torch.ones((), device=DEVICE))
    kernels.step_(rule, params, g_f, g_r, st, coef, hp)
    assert all(torch.equal(x, y) for x, y in zip(before, tensors())), "found_inf"


@pytest.mark.parametrize("backend", backends())
def test_empty_parameter_still_counts_a_step(backend):
    params = [t.to(DEVICE) for t in (torch.empty(0), torch.ones(3))]
    grads = [t.to(DEVICE) for t in (torch.empty(0), torch.full((3,), 0.5))]
    hp = step_hyper("adamw", dict(lr=0.1))
    st = RuleStateLists(step=[torch.tensor(0.0, device=DEVICE), torch.tensor(7.0, device=DEVICE)],
                        exp_avg=[torch.zeros_like(p) for p in params], exp_avg_sq=[torch.zeros_like(p) for p in params])
    coef = ops.coefficient_vector(ops.gramian(grads, backend=backend), method="none", backend=backend)
    get_backend(backend).step_("adamw", params, grads, None, st, coef, hp)
    assert [s.item() for s in st.step] == [1.0, 8.0]
    zeros = torch.zeros(3, dtype=torch.float64)
    rs = ref.RuleState(step=7, exp_avg=zeros.clone(), exp_avg_sq=zeros.clone())
    want = ref.adamw_step(torch.ones(3), torch.full((3,), 0.5), rs, **reference_rule_kwargs("adamw", hp))
    assert_close_rel(flat64(params[1:]), want, step_rtol(torch.float32), "params")


# ------------------------------------------------------------------------- update-space surgery
# Backends that implement update-space surgery (docs/design.md, Update-space surgery) say so with
# ``supports_update_space(device)``; the others hand those steps to the torch backend. The rows
# below cover every backend that says so (and one that cannot run here, skipped).


def update_space_table() -> list:
    rows = table({"config": {c: c for c in RULE_CONFIGS}}, light=lambda *values: False)
    keep = []
    for row in rows:
        name = row.values[0]
        if UNAVAILABLE[name] or get_backend(name, row.values[1]).supports_update_space(DEVICE):
            keep.append(row)
    return keep


def retain_change_magnitude(rule, p, g_f, g_r, rs, lam, clip, **hp) -> float:
    """The sum of the magnitudes of the terms of -<u, g_r>: the reference step on absolute values (every term
    then moves theta the same way) with the true step's Adam denominators, the scale of the rounding
    errors of K0, K1, K2."""
    st = copy.deepcopy(rs)
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        if getattr(st, key) is not None:
            setattr(st, key, getattr(st, key).abs())
    l2 = hp.get("weight_decay", 0.0) if rule == "adam" else 0.0
    # the reference squares g0 + l2 |theta|: this g0 gives the true step's (g_f + l2 theta)^2
    g0 = (g_f + l2 * p).abs() - l2 * p.abs()
    d = clip * (g_f.abs() + lam * g_r.abs())
    new = ref.rule_step(rule, p.abs(), d, st, preconditioner_gradient=g0, **hp)
    return float((p.abs() - new) @ g_r.abs())


@pytest.mark.parametrize("backend, dtype, size, config", update_space_table())
def test_update_terms(backend, dtype, size, config):
    """update_terms: the Gramian and (K0, K1, K2, T0) with -<u, g_r> = K0 + c (K1 + lambda K2) for the step
    d = c (g_f + lambda g_r) (Adam's denominator from the uncorrected g_f), T0 = <theta, g_r>; and the step
    that goes with them."""
    rule, options = RULE_CONFIGS[config]
    hp = dataclasses.replace(step_hyper(rule, options), uncorrected_preconditioner=True)
    kernels = get_backend(backend, dtype)
    shapes = SIZE_CASES[size]
    params = make_tensors(shapes, dtype, seed=70, device=DEVICE)
    g_f, g_r = conflicting_pair(shapes, dtype, seed=71, device=DEVICE)
    # a second moment v > 0 everywhere: at v = 0 the denominator sqrt((g_f + l2 theta)^2) + eps turns the
    # float32 rounding of g_f + l2 theta into an unbounded relative error where g_f ~ -l2 theta (a condition
    # of the data, not of the kernels: the update kernel forms the same denominator the same way)
    st = initial_state(rule, hp, params, dtype, seed=72, steps=(7, 9999))
    got = kernels.update_terms(rule, params, g_f, g_r, st, hp).cpu()
    assert got.dtype == torch.float64 and got.shape == (TERMS_LEN,)
    x, y = flat64(g_f), flat64(g_r)
    gram_bound = gramian_bound(x.numel()) * torch.stack([x @ x, x.abs() @ y.abs(), y @ y])
    assert_within(got[:3], ref.gramian(x, y), gram_bound, f"update terms' Gramian {config} {backend} {dtype} {size}")
    got = got[TERM_SLOTS.index("k0"):]
    kwargs = reference_rule_kwargs(rule, hp)
    want, magnitude = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for i, p in enumerate(params):
        rs = ref.RuleState(step=int(st.step[i].item()))
        for key in state_keys(st):
            if key != "momentum_buffer" or rs.step > 0:
                setattr(rs, key, flat64([getattr(st, key)[i]]))
        p64, f64, r64 = flat64([p]), flat64([g_f[i]]), flat64([g_r[i]])
        change = {(lam, c): -ref.first_order_retain_change(rule, p64, f64, r64, rs, lam, c, **kwargs)
                  for lam, c in ((0.0, 0.0), (0.0, 1.0), (1.0, 1.0))}
        size_of = {(lam, c): retain_change_magnitude(rule, p64, f64, r64, rs, lam, c, **kwargs) for lam, c in change}
        want += torch.tensor([change[0.0, 0.0], change[0.0, 1.0] - change[0.0, 0.0],
                              change[1.0, 1.0] - change[0.0, 1.0], float(p64 @ r64)], dtype=torch.float64)
        magnitude += torch.tensor([size_of[0.0, 0.0], size_of[0.0, 1.0], size_of[1.0, 1.0],
                                   float(p64.abs() @ r64.abs())], dtype=torch.float64)
    # K: the fused step's float32 roundings (tests/fixtures.py) on every term; T0: a float64 dot product
    n = sum(p.numel() for p in params)
    bound = torch.cat([STEP_U32_ROUNDINGS * U32 * magnitude[:3], gramian_bound(n) * magnitude[3:]])
    assert_within(got, want, bound, f"update terms {config} {backend} {dtype} {size}")

    # the step with the uncorrected preconditioner: d = ca g_f + cb g_r, Adam's denominator from g_f
    coef = torch.zeros(COEF_LEN, dtype=torch.float32)
    coef[CA], coef[CB] = 0.8, 0.4
    want_p = []
    for i, p in enumerate(params):
        rs = ref.RuleState(step=int(st.step[i].item()))
        for key in state_keys(st):
            if key != "momentum_buffer" or rs.step > 0:
                setattr(rs, key, flat64([getattr(st, key)[i]]))
        d = 0.8 * flat64([g_f[i]]) + 0.4 * flat64([g_r[i]])
        want_p.append(ref.rule_step(rule, flat64([p]), d, rs, preconditioner_gradient=flat64([g_f[i]]), **kwargs))
    kernels.step_(rule, params, g_f, g_r, st, coef.to(DEVICE), hp)
    assert_close_rel(flat64(params), torch.cat(want_p), step_rtol(dtype), f"update-space step {config} {backend}",
                     subnormal_spacing(dtype))


# ---------------------------------------------------------------------------------- optimizer


def optimizer_shapes(backend: str) -> list:
    return [(1,), (7,), (65, 63)] if INTERPRETED.get(backend) else SIZE_CASES["many_small_plus_large"]


OPTIMIZER_STORAGE = {
    "float32": (torch.float32, None),
    "bfloat16-state_float32": (torch.bfloat16, torch.float32),
    "float16-state_float32": (torch.float16, torch.float32),
    "bfloat16": (torch.bfloat16, None),
}


def optimizer_rows() -> list:
    rows = []
    for name in BACKEND_NAMES:
        for surgery in SURGERY_NAMES:
            for config in RULE_CONFIGS:
                rows.append(backend_param(name, surgery, config, "float32", id=f"{name}-{surgery}-{config}-float32",
                                          threads=1))
        for storage in list(OPTIMIZER_STORAGE)[1:]:  # narrow storage: one explicit and one implicit row per rule
            for surgery, config in (("ungrad", "adamw-decoupled"), ("none", "sgd-momentum")):
                rows.append(backend_param(name, surgery, config, storage, id=f"{name}-{surgery}-{config}-{storage}",
                                          threads=1))
    return rows


def reference_state(opt: EUPMU, p: Tensor, keys) -> ref.RuleState:
    """The reference's state for one parameter, read from the optimizer's stored state (fresh before step 1)."""
    state = opt.state.get(p, {})
    rs = ref.RuleState(step=int(state["step"].item()) if "step" in state else 0)
    for key in keys:
        if key in state:
            setattr(rs, key, flat64([state[key]]))
    return rs


@pytest.mark.filterwarnings("ignore:EUPMU.mode='implicit'..step.. ran without combine")
@pytest.mark.parametrize("backend, surgery, config, storage", optimizer_rows())
def test_optimizer_step(backend, surgery, config, storage):
    """EUPMU(backend=...).step() against the reference, two steps with clipping active: explicit mode for
    every registered two-gradient rule, implicit mode (the rule "none": d = clipped .grad) for the
    one-gradient case. Each step is compared from the optimizer's own stored state."""
    rule, options = RULE_CONFIGS[config]
    dtype, state_dtype = OPTIMIZER_STORAGE[storage]
    shapes = optimizer_shapes(backend)
    params = [torch.nn.Parameter(t) for t in make_tensors(shapes, dtype, seed=60, device=DEVICE)]
    explicit = surgery != "none"
    settings = SURGERY_SETTINGS if explicit else dict(tolerance=0.0, alpha=1.0)
    g_f0, g_r0 = conflicting_pair(shapes, dtype, seed=61)
    r0 = flat64(g_r0) if explicit else torch.zeros_like(flat64(g_r0))
    natural = ref.surgery(flat64(g_f0), r0, surgery, eps=settings["tolerance"], alpha=settings["alpha"]).norm().item()
    max_norm = 0.5 * natural  # the steps' gradients are alike: clipping is active in both
    mode = dict(mode="explicit", surgery=surgery, **settings) if explicit else dict(mode="implicit", dual="paper")
    opt = EUPMU(params, rule=rule, backend=backend, max_grad_norm=max_norm, state_dtype=state_dtype,
                **options, **mode)
    hp = step_hyper(rule, options)
    keys = RULES[rule].active_state_keys({**RULES[rule].default_hyperparameters(), **options})
    for k in range(2):
        g_f, g_r = conflicting_pair(shapes, dtype, seed=61 + k, device=DEVICE)
        opt.zero_grad()
        if explicit:
            for p, g in zip(params, g_r):
                p.grad = g.clone()
            opt.stash_retain_grad()
        for p, g in zip(params, g_f):
            p.grad = g.clone()
        r64 = flat64(g_r) if explicit else torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        d = ref.surgery(flat64(g_f), r64, surgery, eps=settings["tolerance"], alpha=settings["alpha"],
                        max_norm=max_norm)
        want_p, want_state, offset = [], {key: [] for key in keys}, 0
        for p in params:
            rs = reference_state(opt, p, keys)
            want_p.append(getattr(ref, f"{rule}_step")(flat64([p]), d[offset:offset + p.numel()], rs,
                                                      **reference_rule_kwargs(rule, hp)))
            for key in keys:
                want_state[key].append(getattr(rs, key))
            offset += p.numel()
        opt.step()
        what = f"{backend} {surgery} {config} {storage} step {k}"
        assert opt.stats()["skipped"].item() == 0.0, what
        assert_close_rel(flat64(params), torch.cat(want_p), step_rtol(dtype), what + " params",
                         subnormal_spacing(dtype))
        for key, values in want_state.items():
            stored = [opt.state[p][key] for p in params]
            assert all(t.dtype == (state_dtype or dtype) for t in stored), (what, key)
            assert_close_rel(flat64(stored), torch.cat(values), step_rtol(state_dtype or dtype), f"{what} {key}",
                             subnormal_spacing(state_dtype or dtype))
        assert all(opt.state[p]["step"].item() == k + 1 for p in params), what


# One step from identical states differs only by float32 rounding (tests/fixtures.py); every step below
# starts from the torch backend's state (see `resync`), so errors cannot pile up over the trajectory.
TRAJECTORY_STEPS = 10


@torch.no_grad()
def resync(model, ours: EUPMU, twin, theirs: EUPMU) -> None:
    """Start the next step of the compared run from the torch run's parameters, state and multiplier."""
    for p, q in zip(model.parameters(), twin.parameters()):
        p.copy_(q)
        for key, value in theirs.state[q].items():
            ours.state[p][key].copy_(value)
    if theirs.dual.state is not None:
        ours.dual.state.load(theirs.dual.state.to_dict())


def trajectory_model() -> torch.nn.Module:
    """Odd sizes: a 5400-element weight spans a full (fast) block and a tail, and the retain-buffer
    views after the first layer are not 16-byte aligned (general path)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 600), torch.nn.Tanh(),
                               torch.nn.Linear(600, 3)).to(DEVICE)


def trajectory_losses(model: torch.nn.Module, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x_f, x_r = torch.randn(8, 5, generator=gen).to(DEVICE), torch.randn(16, 5, generator=gen).to(DEVICE)
    y_f = torch.randint(0, 3, (8,), generator=gen).to(DEVICE)
    y_r = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)
    ce = torch.nn.functional.cross_entropy
    return -ce(model(x_f), y_f), ce(model(x_r), y_r)


def trajectory_rows() -> list:
    rows = []
    for name in BACKEND_NAMES:
        if name == "torch":
            continue
        # one row per kind of optimizer state (the other variants are rows of test_step and test_optimizer_step)
        rows += [backend_param(name, "explicit", config, id=f"{name}-explicit-{config}", threads=1)
                 for config in ("sgd-momentum", "sgd-nesterov", "adam-l2", "adamw-decoupled")]
        rows += [backend_param(name, "implicit", config, id=f"{name}-implicit-{config}", threads=1)
                 for config in ("adamw-decoupled", "sgd-momentum")]
    return rows


@pytest.mark.parametrize("backend, mode, config", trajectory_rows())
def test_optimizer_follows_the_torch_backend(backend, mode, config):
    """Real gradients of a model, step by step from identical states: explicit UNGrad with clipping, and
    implicit mode with the exact dual update, whose multiplier w is compared too."""
    rule, options = RULE_CONFIGS[config]
    kwargs = dict(rule=rule, mode=mode, tolerance=0.01, max_grad_norm=0.5, **options)
    if mode == "implicit":
        kwargs.update(dual="paper", dual_lr=0.5, w_init=0.5)
    model = trajectory_model()
    twin = copy.deepcopy(model)
    ours = EUPMU(model.parameters(), backend=backend, **kwargs)
    theirs = EUPMU(twin.parameters(), backend="torch", **kwargs)
    rtol = step_rtol(torch.float32)
    surgery_steps = 0
    for step in range(TRAJECTORY_STEPS):
        retain_after = []
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            forget, retain = trajectory_losses(net, step)
            if mode == "explicit":
                retain.backward()
                opt.stash_retain_grad()
                forget.backward()
                opt.step()
            else:
                opt.combine(forget, retain).backward()
                opt.step()
                with torch.no_grad():
                    after = trajectory_losses(net, step)[1]
                opt.update_dual(after)
                retain_after.append(after.item())
        what = f"{backend} {mode} {config} step {step}"
        assert_close_rel(flat64(model.parameters()), flat64(twin.parameters()), rtol, what)
        for p, q in zip(model.parameters(), twin.parameters()):
            for key, value in theirs.state[q].items():
                assert_close_rel(ours.state[p][key], value, rtol, f"{what} {key}")
        if mode == "explicit":
            surgery_steps += int(theirs.stats()["lambda"].item() > 0)
            # lambda* from float64 Gramians of the same gradients: equal up to its float32 rounding
            torch.testing.assert_close(ours.stats()["lambda"], theirs.stats()["lambda"], rtol=4 * U32, atol=0)
        else:
            # From the same state, w moves by -beta ((L_r(t) - L_r(t+1)) / lr + eps): the runs differ only through
            # L_r(t+1), which the float32 rounding of theta_{t+1} moved by |r_ours - r_theirs|
            explained = kwargs["dual_lr"] * abs(retain_after[0] - retain_after[1]) / options["lr"]
            assert abs(ours.w.item() - theirs.w.item()) <= explained * (1 + 1e-3) + 8 * U32 * abs(theirs.w.item())
        resync(model, ours, twin, theirs)
    if mode == "explicit":
        assert surgery_steps > 0  # the constraint was active: surgery itself was compared


@pytest.mark.parametrize("backend", backends())
def test_nonfinite_gradient_skips_the_whole_optimizer_step(backend):
    model = trajectory_model()
    opt = EUPMU(model.parameters(), backend=backend, mode="explicit", rule="adamw", lr=1e-2)

    def gradients(step: int) -> None:
        opt.zero_grad()
        forget, retain = trajectory_losses(model, step)
        retain.backward()
        opt.stash_retain_grad()
        forget.backward()

    gradients(0)
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    gradients(1)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    assert after.keys() == state.keys() and len(state) == 3 * len(params)
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert opt.stats()["skipped"].item() == 1.0


# ---------------------------------------------------------------------------------- the table itself


def test_table_covers_every_registered_rule_and_backend():
    """Generated from the registries: a rule registered in eupmu_kernels.surgery or eupmu_kernels.rules is a
    row of every table above without editing this module (the reference must know it)."""
    from eupmu_kernels.surgery import SURGERY_RULES

    assert set(SURGERY_NAMES) == set(SURGERY_RULES)
    assert {rule for rule, _ in RULE_CONFIGS.values()} == set(RULES)
    gram = torch.tensor([4.0, -2.5, 2.0], dtype=torch.float64)
    for name in SURGERY_RULES:  # the float64 oracle has a case for each
        ref.pair_coefficients(gram, name)
    for rule in RULES:
        assert callable(getattr(ref, f"{rule}_step"))
    assert set(BACKEND_NAMES) == {"torch", "triton", "native"}
