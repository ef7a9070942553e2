"""Triton kernels (interpreter on CPU, compiled on CUDA) against the float64 reference.

Low-precision outputs are compared after one launch against the reference applied to the same
stored inputs, so the error budget is one rounding of the stored value plus float32 math (the
interpreter truncates fp32 -> bf16 stores, hence about two bf16 ulps).
"""

from __future__ import annotations

import pytest
import torch
from gramian_range import huge_pair, tiny_forget_pair, truth, wide_range_pair
from helpers import SIZE_CASES, STORAGE_DTYPES, assert_close_rel, flat64, make_tensors
from torch import Tensor

from eupmu_kernels import coefficients as torch_coefficients
from eupmu_kernels import reference as ref
from eupmu_kernels.backends.base import (
    CA,
    CB,
    CLIP,
    COEF_LEN,
    COS,
    DNORM,
    LAM,
    SKIP,
    A,
    RuleStateLists,
    StepHyper,
    SurgeryConfig,
)
from eupmu_kernels.backends.triton_backend import TritonBackend

BACKEND = TritonBackend()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(not (BACKEND.available() and BACKEND.supports(DEVICE, torch.float32)),
                       reason="triton is not installed, or CPU tensors without TRITON_INTERPRET=1"),
    # the interpreter computes with numpy, which warns about the inf/nan the guards are tested with
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """The tensors here are tiny: more intra-op threads only add contention on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# stored-output tolerance: one rounding of the stored dtype (bf16: the interpreter truncates) + fp32 math
OUT_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
METHODS = ("ungrad", "pcgrad", "graddiff", "none")


def on_device(tensors: list[Tensor]) -> list[Tensor]:
    return [t.to(DEVICE) for t in tensors]


def host64(tensors) -> Tensor:
    """Flat float64 copy on the host, where the reference runs."""
    return flat64([t.cpu() for t in tensors])


def conflicting_pair(shapes, dtype, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """(g_f, g_r) with <g_f, g_r> < 0, so that surgery has something to do."""
    g_f = make_tensors(shapes, dtype, seed=seed)
    noise = make_tensors(shapes, dtype, seed=seed + 100)
    g_r = [(-0.7 * f.double() + 0.5 * r.double()).to(dtype) for f, r in zip(g_f, noise)]
    return on_device(g_f), on_device(g_r)


def assert_stored_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """Element-wise within ``OUT_RTOL`` of the largest entry, and within it in norm."""
    rtol = OUT_RTOL[dtype]
    actual = actual.detach().cpu().double().reshape(-1)
    expected = expected.detach().cpu().double().reshape(-1)
    assert_close_rel(actual, expected, rtol, what)
    worst = (actual - expected).abs().max()
    assert worst <= rtol * expected.abs().max() + 1e-30, f"{what}: max abs error {worst:.3e}"


# ---------------------------------------------------------------------- Gramian


@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gramian_matches_reference(case, dtype):
    shapes = SIZE_CASES[case]
    a = on_device(make_tensors(shapes, dtype, seed=1))
    b = on_device(make_tensors(shapes, dtype, seed=2))
    g = BACKEND.gramian(a, b)
    assert g.dtype == torch.float64 and g.shape == (3,) and g.device.type == DEVICE.type
    expected = ref.gramian(host64(a), host64(b))
    scale = torch.stack([expected[0], expected[0].sqrt() * expected[2].sqrt(), expected[2]])
    assert torch.all((g.cpu().double() - expected).abs() <= 1e-5 * scale), (g, expected)

    g_a = BACKEND.gramian(a, None)
    assert g_a[1].item() == 0.0 and g_a[2].item() == 0.0
    assert abs(g_a[0].item() - expected[0].item()) <= 1e-5 * expected[0].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gramian_is_bit_identical_run_to_run(dtype):
    from eupmu_kernels.triton.tables import TABLES

    shapes = SIZE_CASES["many_small_plus_large"]
    a = on_device(make_tensors(shapes, dtype, seed=3))
    b = on_device(make_tensors(shapes, dtype, seed=4))
    first = BACKEND.gramian(a, b)
    again = BACKEND.gramian(a, b)
    TABLES.clear()  # a rebuilt table must give the same bits too
    rebuilt = BACKEND.gramian(a, b)
    assert torch.equal(first, again) and torch.equal(first, rebuilt)


@pytest.mark.parametrize("where", ["small tensor", "full block", "tail of a block"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_input_gives_nonfinite_gramian(where, bad):
    shapes = [(7,), (3, 5), (4097,)]
    index = {"small tensor": (1, 4), "full block": (2, 100), "tail of a block": (2, 4096)}[where]
    a = on_device(make_tensors(shapes, seed=5))
    b = on_device(make_tensors(shapes, seed=6))
    b[index[0]].view(-1)[index[1]] = bad
    assert not torch.isfinite(BACKEND.gramian(a, b)).all()
    b[index[0]].view(-1)[index[1]] = 1.0
    a[index[0]].view(-1)[index[1]] = bad
    assert not torch.isfinite(BACKEND.gramian(a, None)).all()


def test_empty_tensors_are_skipped():
    a = on_device([torch.empty(0), torch.ones(3), torch.empty(2, 0)])
    b = on_device([torch.empty(0), torch.full((3,), 2.0), torch.empty(2, 0)])
    assert BACKEND.gramian(a, b).cpu().tolist() == [3.0, 6.0, 12.0]
    assert BACKEND.gramian(a[:1], b[:1]).cpu().tolist() == [0.0, 0.0, 0.0]


def test_table_is_cached_while_tensors_stay():
    from eupmu_kernels.triton.tables import TABLES

    a = on_device(make_tensors([(5,), (4097,)], seed=7))
    BACKEND.gramian(a, None)
    builds = TABLES.builds
    BACKEND.gramian(a, None)
    assert TABLES.builds == builds
    BACKEND.gramian([t.clone() for t in a], None)
    assert TABLES.builds == builds + 1


# ---------------------------------------------------------------------- numerical range
# The Gramian is accumulated from float64 products, so it is right for any finite inputs: element
# products far below the smallest normal float32 and sums far beyond the largest float32 alike.
# Tolerances: float64 accumulation of ~4e3 exact products (~1e-13 relative), then one float32
# rounding of the coefficient slot (6e-8); 1e-6 leaves room and still fails the float32 kernels
# (they return lambda = 0 or a skipped step here, or lose ~10% to subnormal products).


def range_coefficients(f, r, max_norm=None):
    f, r = on_device(f), on_device(r)
    gram = BACKEND.gramian(f, r)
    coef = BACKEND.coefficients(gram, SurgeryConfig("ungrad", max_norm=max_norm), None, None)
    return f, r, gram.cpu(), coef.cpu().double()


def assert_range_case(f, r, what):
    want = truth(f, r)
    _, _, gram, coef = range_coefficients(f, r)
    assert gram.dtype == torch.float64
    for k, name in enumerate(("aa", "ab", "bb")):
        assert gram[k].item() == pytest.approx(want[name], rel=1e-12), (what, name)
    assert coef[SKIP].item() == 0.0, what
    assert coef[LAM].item() == pytest.approx(want["lam"], rel=1e-6), what
    assert coef[CB].item() == pytest.approx(want["lam"], rel=1e-6), what
    assert coef[COS].item() == pytest.approx(want["cos"], rel=1e-6), what
    return coef


@pytest.mark.parametrize("norm_r", [1.0, 1e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forget_gradient_gives_tiny_lambda(dtype, norm_r):
    f, r = tiny_forget_pair(dtype, norm_r)
    coef = assert_range_case(f, r, f"{dtype} |g_r|={norm_r}")
    if dtype == torch.float32:  # rounding g_f to float32 moves lambda by ~1e-8 relative
        assert coef[LAM].item() == pytest.approx(1e-30, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_finite_gradients_are_not_skipped(dtype):
    f, r = huge_pair(dtype)
    assert all(torch.isfinite(t).all() for t in f + r)
    assert_range_case(f, r, f"{dtype} elements ~1e20")
    # the combined direction is the reference's, and finite
    f_dev, r_dev, _, coef = range_coefficients(f, r)
    expected = ref.surgery(host64(f), host64(r), "ungrad")
    BACKEND.combine_(f_dev, r_dev, coef.float().to(DEVICE))
    assert torch.isfinite(host64(f_dev)).all()
    assert_stored_close(host64(f_dev), expected, dtype, f"combine {dtype} ~1e20")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gramian_over_the_whole_dtype_range(dtype):
    f, r = wide_range_pair(dtype)
    assert_range_case(f, r, f"{dtype} wide range")


def test_coefficients_read_float64_gramians_beyond_float32():
    cfg = SurgeryConfig("ungrad")
    got = BACKEND.coefficients(torch.tensor([1e50, -5e49, 1e50], dtype=torch.float64, device=DEVICE), cfg,
                               None, None).cpu()
    assert got[SKIP].item() == 0.0 and got[LAM].item() == pytest.approx(0.5, rel=1e-7)
    assert got[COS].item() == pytest.approx(-0.5, rel=1e-7) and got[DNORM].item() == pytest.approx(
        (1e50 - 0.25e50) ** 0.5, rel=1e-7)
    # and float32 Gramians as before
    legacy = BACKEND.coefficients(torch.tensor([4.0, -2.0, 1.0], device=DEVICE), cfg, None, None).cpu()
    assert (legacy[CA].item(), legacy[CB].item(), legacy[SKIP].item()) == (1.0, 2.0, 0.0)
    # a coefficient beyond float32 cannot be applied by the float32 update: skip, never write inf
    # (|g_f| = 1e40, |g_r| = 1e-40, cos = -1: lambda = 1e80)
    huge_lam = BACKEND.coefficients(torch.tensor([1e80, -1.0, 1e-80], dtype=torch.float64, device=DEVICE), cfg,
                                    None, None).cpu()
    assert (huge_lam[CA].item(), huge_lam[CB].item(), huge_lam[SKIP].item()) == (1.0, 0.0, 1.0)


# ---------------------------------------------------------------------- coefficients

GRAMS = {
    "conflict": [4.0, -2.5, 2.0],
    "agree": [4.0, 2.5, 2.0],
    "zero retain": [4.0, 0.0, 0.0],
    "zero forget": [0.0, 0.0, 2.0],
    "both zero": [0.0, 0.0, 0.0],
    "large": [3e30, -1e30, 5e29],
}


def reference_coefficients(gram: list[float], method: str, eps: float, alpha: float, max_norm: float | None,
                           inv: float) -> dict[int, float]:
    """The float64 reference of the coefficient slots for a finite (scaled) Gramian."""
    g = torch.tensor(gram, dtype=torch.float64) * inv * inv
    if method == "none":
        a, b = 1.0, 0.0
    else:
        a, b = ref.pair_coefficients(g, method, eps, alpha)
    dnorm = ref.combined_norm(g, a, b)
    clip = ref.clip_factor(dnorm, max_norm)
    return {CA: a * clip * inv, CB: b * clip * inv, SKIP: 0.0, LAM: b, CLIP: clip, DNORM: dnorm, A: a}


@pytest.mark.parametrize("method", METHODS)
def test_coefficients_match_reference_and_torch_path(method):
    for name, gram in GRAMS.items():
        for max_norm in (None, 0.7):
            for inv in (None, 0.25):
                cfg = SurgeryConfig(method=method, tolerance=0.5, alpha=0.3, max_norm=max_norm)
                g = torch.tensor(gram, device=DEVICE)
                inv_t = None if inv is None else torch.tensor(inv, device=DEVICE)
                got = BACKEND.coefficients(g, cfg, inv_t, None).cpu()
                assert got.shape == (COEF_LEN,) and got.dtype == torch.float32
                want = torch_coefficients.coefficients(g.cpu(), cfg, None if inv_t is None else inv_t.cpu(), None)
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, msg=f"{method} {name} {max_norm} {inv}")
                expected = reference_coefficients(gram, method, cfg.eps, cfg.alpha, max_norm, inv or 1.0)
                for slot, value in expected.items():
                    assert got[slot].item() == pytest.approx(value, rel=2e-6, abs=1e-30), (method, name, slot)


@pytest.mark.parametrize("gram", [[float("inf"), 1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0, -float("inf")]])
def test_nonfinite_gramian_sets_skip(gram):
    for method in METHODS:
        cfg = SurgeryConfig(method=method, max_norm=1.0)
        g = torch.tensor(gram, device=DEVICE)
        got = BACKEND.coefficients(g, cfg, None, None).cpu()
        assert (got[CA].item(), got[CB].item(), got[SKIP].item()) == (1.0, 0.0, 1.0), method
        want = torch_coefficients.coefficients(g.cpu(), cfg, None, None)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, equal_nan=True)


def test_found_inf_and_inv_scale():
    g = torch.tensor([4.0, -2.0, 1.0], device=DEVICE) * 16.0  # gradients scaled by 4
    inv = torch.tensor(0.25, device=DEVICE)
    cfg = SurgeryConfig()
    coef = BACKEND.coefficients(g, cfg, inv, torch.zeros(1, device=DEVICE)).cpu()
    assert (coef[CA].item(), coef[CB].item(), coef[SKIP].item()) == (0.25, 0.5, 0.0)
    skipped = BACKEND.coefficients(g, cfg, inv, torch.ones(1, device=DEVICE)).cpu()
    assert (skipped[CA].item(), skipped[CB].item(), skipped[SKIP].item()) == (1.0, 0.0, 1.0)
    assert skipped[LAM].item() == 2.0 and skipped[COS].item() == pytest.approx(-1.0)


# ---------------------------------------------------------------------- combine


@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_combine_matches_reference(case, dtype):
    g_f, g_r = conflicting_pair(SIZE_CASES[case], dtype, seed=10)
    natural = ref.surgery(host64(g_f), host64(g_r), "ungrad", eps=0.01).norm().item()
    max_norm = 0.5 * natural  # clipping active
    expected = ref.surgery(host64(g_f), host64(g_r), "ungrad", eps=0.01, max_norm=max_norm)
    coef = BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig("ungrad", tolerance=0.01, max_norm=max_norm),
                                None, None)
    assert coef[LAM].item() > 0
    g_r_before = [t.clone() for t in g_r]
    BACKEND.combine_(g_f, g_r, coef)
    assert_stored_close(host64(g_f), expected, dtype, f"combine {case} {dtype}")
    assert all(torch.equal(x, y) for x, y in zip(g_r, g_r_before))


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_combine_pcgrad_and_one_gradient(dtype):
    shapes = SIZE_CASES["many_small_plus_large"]
    g_f, g_r = conflicting_pair(shapes, dtype, seed=11)
    expected = ref.pcgrad(host64(g_f), host64(g_r))
    BACKEND.combine_(g_f, g_r, BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig("pcgrad"), None, None))
    assert_stored_close(host64(g_f), expected, dtype, "pcgrad")

    g = on_device(make_tensors(shapes, dtype, seed=12))
    norm = host64(g).norm().item()
    coef = BACKEND.coefficients(BACKEND.gramian(g, None), SurgeryConfig("none", max_norm=0.25 * norm), None, None)
    expected = host64(g) * (0.25 * norm / (norm + ref.CLIP_EPS))
    BACKEND.combine_(g, None, coef)
    assert_stored_close(host64(g), expected, dtype, "clip only")


def test_combine_skip_leaves_gradients_unchanged():
    g_f, g_r = conflicting_pair([(7,), (4097,)], torch.float32, seed=13)
    g_r[1][5] = float("nan")
    before = [t.clone() for t in g_f]
    coef = BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig(), None, None)
    BACKEND.combine_(g_f, g_r, coef)
    assert all(torch.equal(x, y) for x, y in zip(g_f, before))


# ---------------------------------------------------------------------- fused step

RULES = {
    "sgd": ("sgd", dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    "sgd_nesterov": ("sgd", dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgd_plain": ("sgd", dict(lr=0.5)),
    "adam": ("adam", dict(lr=0.1, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)),
    "adamw": ("adamw", dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5)),
}


def reference_hyper(rule: str, hp: dict) -> dict:
    if rule == "sgd":
        return {k: hp[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov") if k in hp}
    return dict(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"], weight_decay=hp["weight_decay"])


def initial_state(params: list[Tensor], rule: str, state_dtype: torch.dtype) -> RuleStateLists:
    """Steps differ per tensor (0, 7, 14, ...) with matching non-trivial moments and buffers."""
    gen = torch.Generator().manual_seed(21)

    def like(p: Tensor, positive: bool = False) -> Tensor:
        x = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        return (x.abs() * 0.1 if positive else x).to(state_dtype).to(DEVICE)

    st = RuleStateLists(step=[torch.tensor(float(7 * (i % 3)), device=DEVICE) for i in range(len(params))])
    if rule == "sgd":
        st.momentum_buffer = [like(p) for p in params]
    else:
        st.exp_avg = [like(p) for p in params]
        st.exp_avg_sq = [like(p, positive=True) for p in params]
    return st


def reference_step(rule: str, hp: dict, params, d: Tensor, st: RuleStateLists):
    """Float64 reference applied to the stored tensors; returns (params, moment lists) as flat float64."""
    new_p, m1, m2, offset = [], [], [], 0
    for i, p in enumerate(params):
        n = p.numel()
        step = int(st.step[i].item())
        rs = ref.RuleState(step=step)
        if rule == "sgd":
            rs.momentum_buffer = host64([st.momentum_buffer[i]]) if step > 0 else None
        else:
            rs.exp_avg, rs.exp_avg_sq = host64([st.exp_avg[i]]), host64([st.exp_avg_sq[i]])
        new_p.append(ref.rule_step(rule, p.cpu(), d[offset:offset + n], rs, **reference_hyper(rule, hp)))
        if rule == "sgd":
            m1.append(rs.momentum_buffer if rs.momentum_buffer is not None else torch.zeros(n, dtype=torch.float64))
        else:
            m1.append(rs.exp_avg)
            m2.append(rs.exp_avg_sq)
        offset += n
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return torch.cat(new_p), cat(m1), cat(m2)


def run_step_case(key: str, shapes, dtype: torch.dtype, state_dtype: torch.dtype, steps: int = 2) -> None:
    rule, hp = RULES[key]
    g_f, g_r = conflicting_pair(shapes, dtype, seed=30)
    params = on_device(make_tensors(shapes, dtype, seed=31))
    st = initial_state(params, rule, state_dtype)
    coef = BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig("ungrad", tolerance=0.01), None, None)
    d = ref.surgery(host64(g_f), host64(g_r), "ungrad", eps=0.01)
    step_hyper = StepHyper(**hp)
    for it in range(steps):
        want_p, want_1, want_2 = reference_step(rule, hp, params, d, st)
        steps_before = [s.item() for s in st.step]
        BACKEND.step_(rule, params, g_f, g_r, st, coef, step_hyper)
        what = f"{key} {dtype} state {state_dtype} step {it}"
        assert_stored_close(host64(params), want_p, dtype, f"params, {what}")
        if rule == "sgd" and hp.get("momentum", 0) != 0:
            assert_stored_close(host64(st.momentum_buffer), want_1, state_dtype, f"momentum, {what}")
        elif rule != "sgd":
            assert_stored_close(host64(st.exp_avg), want_1, state_dtype, f"exp_avg, {what}")
            assert_stored_close(host64(st.exp_avg_sq), want_2, state_dtype, f"exp_avg_sq, {what}")
        assert [s.item() for s in st.step] == [s + 1 for s in steps_before]


@pytest.mark.parametrize("key", list(RULES))
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_step_matches_reference_fp32(key, case):
    run_step_case(key, SIZE_CASES[case], torch.float32, torch.float32)


@pytest.mark.parametrize("key", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_low_precision_params_with_fp32_state(key, dtype):
    run_step_case(key, SIZE_CASES["many_small_plus_large"], dtype, torch.float32, steps=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key", ["sgd", "adamw"])
def test_step_low_precision_state(dtype, key):
    run_step_case(key, [(7,), (4097,)], dtype, dtype, steps=1)


def test_step_without_retain_gradient_and_large_step_counts():
    # implicit mode: d = ca * g_f; bias corrections at t ~ 1e4 need float64 powers
    shapes = [(7,), (4097,)]
    g = on_device(make_tensors(shapes, seed=40))
    params = on_device(make_tensors(shapes, seed=41))
    st = initial_state(params, "adam", torch.float32)
    st.step = [torch.tensor(9999.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)]
    coef = BACKEND.coefficients(BACKEND.gramian(g, None), SurgeryConfig("none"), None, None)
    _, hp = RULES["adam"]
    want_p, want_m, want_v = reference_step("adam", hp, params, host64(g), st)
    BACKEND.step_("adam", params, g, None, st, coef, StepHyper(**hp))
    assert_stored_close(host64(params), want_p, torch.float32, "params")
    assert_stored_close(host64(st.exp_avg), want_m, torch.float32, "exp_avg")
    assert [s.item() for s in st.step] == [10000.0, 1.0]


@pytest.mark.parametrize("key", ["sgd", "adam", "adamw"])
def test_skip_leaves_params_state_and_step_unchanged(key):
    rule, hp = RULES[key]
    shapes = [(7,), (4097,)]
    g_f, g_r = conflicting_pair(shapes, torch.float32, seed=50)
    g_f[1][4096] = float("inf")
    params = on_device(make_tensors(shapes, seed=51))
    st = initial_state(params, rule, torch.float32)
    before = [t.clone() for t in params + st.step + st.momentum_buffer + st.exp_avg + st.exp_avg_sq]
    coef = BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig(), None, None)
    BACKEND.step_(rule, params, g_f, g_r, st, coef, StepHyper(**hp))
    after = params + st.step + st.momentum_buffer + st.exp_avg + st.exp_avg_sq
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # GradScaler's found_inf skips a finite step the same way
    g_f[1][4096] = 1.0
    coef = BACKEND.coefficients(BACKEND.gramian(g_f, g_r), SurgeryConfig(), None, torch.ones(1, device=DEVICE))
    BACKEND.step_(rule, params, g_f, g_r, st, coef, StepHyper(**hp))
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_empty_parameter_counts_a_step_like_torch_backend():
    from eupmu_kernels.backends.torch_backend import TorchBackend

    def run(backend):
        params = on_device([torch.empty(0), torch.ones(3)])
        grads = on_device([torch.empty(0), torch.full((3,), 0.5)])
        st = initial_state(params, "adamw", torch.float32)
        coef = backend.coefficients(backend.gramian(grads, None), SurgeryConfig("none"), None, None)
        backend.step_("adamw", params, grads, None, st, coef, StepHyper(lr=0.1))
        return params, st

    params, st = run(BACKEND)
    want_params, want_st = run(TorchBackend())
    assert [s.item() for s in st.step] == [s.item() for s in want_st.step] == [1.0, 8.0]
    torch.testing.assert_close(params[1], want_params[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- contract edges


def test_supports_and_layout_errors():
    for dtype in STORAGE_DTYPES:
        assert BACKEND.supports(DEVICE, dtype)
    assert not BACKEND.supports(DEVICE, torch.float64)
    assert not BACKEND.supports(torch.device("meta"), torch.float32)

    p = torch.randn(6, 5, device=DEVICE)
    transposed = torch.randn(5, 6, device=DEVICE).t()  # same shape, other strides
    with pytest.raises(ValueError, match="strides"):
        BACKEND.gramian([p], [transposed])
    strided = torch.randn(12, device=DEVICE)[::2]
    with pytest.raises(ValueError, match="not dense"):
        BACKEND.gramian([strided], None)
    st = RuleStateLists(step=[torch.zeros((), device=DEVICE)], exp_avg=[torch.zeros(6, 5, device=DEVICE)],
                        exp_avg_sq=[torch.zeros(5, 6, device=DEVICE).t()])
    coef = BACKEND.coefficients(BACKEND.gramian([p], None), SurgeryConfig("none"), None, None)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        BACKEND.step_("adam", [p], [p.clone()], None, st, coef, StepHyper(lr=0.1))
    # a dense but transposed parameter works when everything of it shares the layout
    pt = torch.randn(5, 6, device=DEVICE).t()
    g = torch.randn(5, 6, device=DEVICE).t()
    assert torch.isfinite(BACKEND.gramian([pt], [g])).all()
