"""Update-space surgery on every backend (docs/design.md, Update-space surgery).

The torch, Triton (on CPU tensors: the interpreter) and native (C++ CPU kernels) backends each
form the Gramian and the terms (K0, K1, K2, T0) in one reduction pass, solve for lambda* on the
device and take the step with Adam's uncorrected denominator. Every one is checked against the
float64 oracle (``reference.update_space_lambda``, ``reference.rule_step``), which knows nothing
of the terms: it takes the step twice and reads the slope.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import STORAGE_DTYPES, flat64
from hypothesis import given, settings
from hypothesis import strategies as st

from eupmu_kernels import EUPMU
from eupmu_kernels import coefficients as coef_torch
from eupmu_kernels import contract
from eupmu_kernels import reference as ref
from eupmu_kernels.backends.native_backend import NativeBackend
from eupmu_kernels.backends.torch_backend import TorchBackend
from eupmu_kernels.backends.triton_backend import TritonBackend
from eupmu_kernels.contract import RuleStateLists, StepHyper, SurgeryConfig

CPU = torch.device("cpu")
HAVE_TRITON = TritonBackend().available() and TritonBackend().supports(CPU, torch.float32)
HAVE_NATIVE = NativeBackend().available()
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="needs triton with TRITON_INTERPRET=1")),
    pytest.param("native", marks=pytest.mark.skipif(not HAVE_NATIVE, reason="the extension is not built")),
]

RULES = {
    "sgd_momentum": dict(rule="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_dampening": dict(rule="sgd", lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov": dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": dict(rule="adam", lr=1e-2, weight_decay=0.01),
    "adamw": dict(rule="adamw", lr=1e-2, weight_decay=0.1),
}
LARGE = 280 * 250
SIZES = {
    "one": [1],
    "seven": [7],
    "4097": [4097],  # one full block of the Triton kernels and a one-element tail
    "many_small_plus_large": [3 + (i * 7) % 29 for i in range(50)] + [LARGE],
}
# The Triton interpreter costs about a millisecond per block operation: the same shapes, smaller.
TRITON_SIZES = dict(SIZES, many_small_plus_large=[3 + (i * 7) % 29 for i in range(12)] + [4096 + 905])
# float32 arithmetic with an error of a few units in 2^-24 per operation, a handful of operations
F32_MATH = 16 * 2.0**-24


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance from |x| to the next value of ``dtype`` above it (float64 tensor)."""
    info = torch.finfo(dtype)
    mag = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def random_problem(key: str, sizes: list[int], dtype: torch.dtype, seed: int, steps: int, conflict: float):
    """Per tensor: theta, g_f, g_r and the rule's state, rounded to the storage dtype."""
    rule = RULES[key]["rule"]
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for n in sizes:
        theta = torch.randn(n, generator=gen, dtype=torch.float64)
        g_r = torch.randn(n, generator=gen, dtype=torch.float64)
        g_f = -conflict * g_r + torch.randn(n, generator=gen, dtype=torch.float64)
        state = {}
        if steps and rule == "sgd":
            state["momentum_buffer"] = torch.randn(n, generator=gen, dtype=torch.float64)
        if steps and rule != "sgd":
            state["exp_avg"] = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
            state["exp_avg_sq"] = 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)
        tensors.append({name: t.to(dtype) for name, t in dict(theta=theta, g_f=g_f, g_r=g_r, **state).items()})
    return tensors


def step_on(backend: str, key: str, tensors, steps: int, tolerance: float, device: str = "cpu", **extra):
    """One EUPMU update-space step on ``backend`` from the given state; returns the parameters and the optimizer."""
    tensors = [{name: t.to(device) for name, t in entry.items()} for entry in tensors]
    params = [torch.nn.Parameter(t["theta"].clone()) for t in tensors]
    opt = EUPMU(params, mode="explicit", surgery_space="update", tolerance=tolerance, backend=backend,
                **RULES[key], **extra)
    for p, t in zip(params, tensors):
        if steps:
            opt.state[p]["step"] = torch.tensor(float(steps), device=device)
            for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if name in t:
                    opt.state[p][name] = t[name].clone()
    opt.zero_grad()
    for p, t in zip(params, tensors):
        p.grad = t["g_r"].clone()
    opt.stash_retain_grad()
    for p, t in zip(params, tensors):
        p.grad = t["g_f"].clone()
    opt.step()
    return params, opt


def oracle_state(tensors, steps: int) -> ref.RuleState:
    st = ref.RuleState(step=steps)
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in tensors[0]:
            setattr(st, name, flat64(t[name] for t in tensors))
    return st


def hyper(key: str) -> dict:
    return {k: v for k, v in RULES[key].items() if k != "rule"}


def check_step_against_oracle(backend: str, key: str, sizes: list[int], dtype: torch.dtype, seed: int = 3,
                              steps: int = 3, tolerance: float = 0.0, conflict: float = 2.0) -> None:
    tensors = random_problem(key, sizes, dtype, seed, steps, conflict)
    params, opt = step_on(backend, key, tensors, steps, tolerance)
    theta, g_f, g_r = (flat64(t[name] for t in tensors) for name in ("theta", "g_f", "g_r"))
    after = flat64(params)
    rule, lr = RULES[key]["rule"], RULES[key]["lr"]

    # lambda*: the float64 oracle's, up to the float32 denominators of Adam (a few 2^-24 relative)
    # and the float32 rounding of lambda itself
    expected_lam = ref.update_space_lambda(rule, theta, g_f, g_r, oracle_state(tensors, steps), tolerance,
                                           **hyper(key))
    lam = opt.stats()["lambda"].item()
    assert expected_lam > 0  # the constraint is active: a kernel ignoring it would fail here
    assert lam == pytest.approx(expected_lam, rel=2e-5, abs=1e-9)

    # the step: the oracle's with that lambda, to one storage rounding plus float32 arithmetic
    expected = ref.rule_step(rule, theta, g_f + lam * g_r, oracle_state(tensors, steps), preconditioner_gradient=g_f,
                             **hyper(key))
    u = expected - theta
    bound = spacing(expected, dtype) + F32_MATH * (u.abs() + u.abs().max() + theta.abs() * lr)
    err = (after - expected).abs()
    assert torch.all(err <= bound), f"worst excess {(err - bound).max().item():.3e}"

    # the applied update keeps the budget up to the rounding of theta' (storage) and float32 math
    change = float((after - theta) @ g_r)
    rounding = float((spacing(after, dtype) + F32_MATH * ((after - theta).abs() + theta.abs() * lr)) @ g_r.abs())
    assert change <= lr * tolerance + rounding
    measured = opt.stats()["retain_change"].item()
    assert measured == pytest.approx(change, rel=1e-9, abs=1e-12 * float(theta.abs() @ g_r.abs()))


def _cases():
    for backend in BACKENDS:
        name = backend if isinstance(backend, str) else backend.values[0]
        sizes = TRITON_SIZES if name == "triton" else SIZES
        for key in RULES:
            for size in sizes:
                # the interpreter: every dtype on the mixed list, float32 alone on the single tensors
                dtypes = STORAGE_DTYPES if name != "triton" or size == "many_small_plus_large" else (torch.float32,)
                for dtype in dtypes:
                    marks = backend.marks if not isinstance(backend, str) else ()
                    yield pytest.param(name, key, sizes[size], dtype, id=f"{name}-{key}-{size}-{str(dtype)[6:]}",
                                       marks=marks)


@pytest.mark.parametrize("backend, key, sizes, dtype", list(_cases()))
def test_update_space_step_matches_the_float64_oracle(backend, key, sizes, dtype):
    check_step_against_oracle(backend, key, sizes, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["sgd_momentum", "adamw"])
def test_update_space_with_clipping_matches_the_torch_backend(backend, key):
    # the first step: no momentum pushes uphill, so a correction within the clipped norm exists
    tensors = random_problem(key, [7, 300], torch.float32, 5, 0, 2.0)
    params, opt = step_on(backend, key, tensors, 0, 0.0, max_grad_norm=5.0)
    twins, twin_opt = step_on("torch", key, tensors, 0, 0.0, max_grad_norm=5.0)
    assert opt.stats()["clip"].item() < 1.0
    for slot in ("lambda", "clip"):
        assert opt.stats()[slot].item() == pytest.approx(twin_opt.stats()[slot].item(), rel=1e-5)
    g_r = flat64(t["g_r"] for t in tensors)
    theta = flat64(t["theta"] for t in tensors)
    change = float((flat64(params) - theta) @ g_r)
    assert change <= 16 * 2.0**-24 * float(theta.abs() @ g_r.abs())


@settings(max_examples=12, deadline=None)
@given(key=st.sampled_from(list(RULES)), seed=st.integers(0, 10_000), steps=st.sampled_from([0, 1, 7]),
       tolerance=st.sampled_from([0.0, 0.01, 1.0]), conflict=st.floats(0.0, 3.0))
def test_first_order_retain_change_stays_within_the_budget_on_every_backend(key, seed, steps, tolerance, conflict):
    tensors = random_problem(key, [5, 37], torch.float32, seed, steps, conflict)
    theta, g_r = flat64(t["theta"] for t in tensors), flat64(t["g_r"] for t in tensors)
    lr = RULES[key]["lr"]
    names = ["torch"] + (["triton"] if HAVE_TRITON else []) + (["native"] if HAVE_NATIVE else [])
    for backend in names:
        params, _ = step_on(backend, key, tensors, steps, tolerance)
        after = flat64(params)
        change = float((after - theta) @ g_r)
        rounding = float((spacing(after, torch.float32) + F32_MATH * ((after - theta).abs() + theta.abs() * lr))
                         @ g_r.abs())
        assert change <= lr * tolerance + rounding, backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("key", list(RULES))
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_update_space_on_cuda_takes_the_torch_backends_step(backend, key, dtype):
    """The compiled CUDA kernels and the Triton kernels on a GPU against the torch backend there."""
    if backend == "native" and not (HAVE_NATIVE and NativeBackend().supports(torch.device("cuda"), dtype)):
        pytest.skip("the extension has no CUDA kernels")
    tensors = random_problem(key, SIZES["many_small_plus_large"], dtype, 3, 3, 2.0)
    params, opt = step_on(backend, key, tensors, 3, 0.0, device="cuda")
    twins, twin = step_on("torch", key, tensors, 3, 0.0, device="cuda")
    assert opt.stats()["lambda"].item() == pytest.approx(twin.stats()["lambda"].item(), rel=2e-5)
    theta = flat64(t["theta"] for t in tensors)
    ours, theirs = flat64(params).cpu(), flat64(twins).cpu()
    bound = 2 * spacing(theirs, dtype) + F32_MATH * ((theirs - theta).abs() + (theirs - theta).abs().max())
    assert torch.all((ours - theirs).abs() <= bound)
    g_r = flat64(t["g_r"] for t in tensors)
    change = float((ours - theta) @ g_r)
    lr = RULES[key]["lr"]
    assert change <= float((spacing(ours, dtype) + F32_MATH * ((ours - theta).abs() + theta.abs() * lr)) @ g_r.abs())


# ------------------------------------------------------------------------------ the two stages


def _state_lists(tensors, steps: int) -> RuleStateLists:
    out = RuleStateLists(step=[torch.tensor(float(steps + i % 2)) for i in range(len(tensors))])
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in tensors[0]:
            setattr(out, name, [t[name].clone() for t in tensors])
    return out


def _step_hyper(key: str) -> StepHyper:
    kw = hyper(key)
    betas = kw.pop("betas", (0.9, 0.999))
    return StepHyper(beta1=betas[0], beta2=betas[1], uncorrected_preconditioner=True, **kw)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("key", list(RULES))
def test_reduction_pass_matches_the_torch_backend(backend, key):
    """Gramian and terms of one pass, per-tensor step counts differing (first SGD step included)."""
    kernel_backend = TritonBackend() if backend == "triton" else NativeBackend()
    tensors = random_problem(key, [1, 7, 4097, 33], torch.float32, 7, 1, 1.0)
    rule, hp = RULES[key]["rule"], _step_hyper(key)
    lists = [[t[name] for t in tensors] for name in ("theta", "g_f", "g_r")]
    steps = 0 if rule == "sgd" else 1  # SGD: tensors at step 0 and 1; Adam: steps 1 and 2
    got = kernel_backend.update_terms(rule, *lists, _state_lists(tensors, steps), hp)
    want = TorchBackend().update_terms(rule, *lists, _state_lists(tensors, steps), hp)
    # the same sums with every input made non-negative bound the rounding of each term
    absolute = [{k: v.abs() for k, v in t.items()} for t in tensors]
    scale = TorchBackend().update_terms(rule, *[[t[n] for t in absolute] for n in ("theta", "g_f", "g_r")],
                                        _state_lists(absolute, steps), hp).abs()
    # SGD: float64 sums of exact products; Adam: P in float32 (the update's own denominator)
    rtol = 1e-12 if rule == "sgd" else 1e-6
    assert got.dtype == torch.float64 and got.shape == (contract.TERMS_LEN,)
    assert torch.all((got - want).abs() <= rtol * scale), (got, want)


def _random_terms(gen: torch.Generator) -> torch.Tensor:
    aa, bb = 1.0 + 9.0 * torch.rand(2, generator=gen, dtype=torch.float64)
    ab = (2.0 * torch.rand((), generator=gen, dtype=torch.float64) - 1.0) * (aa * bb).sqrt()
    k0, k1 = torch.randn(2, generator=gen, dtype=torch.float64)
    k2 = torch.rand((), generator=gen, dtype=torch.float64)
    return torch.stack([aa, ab, bb, k0, k1 - 2.0, k2, torch.randn((), generator=gen, dtype=torch.float64)])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("max_norm", [None, 0.5, 100.0])
def test_coefficient_stage_is_the_torch_formula_bit_for_bit(backend, max_norm):
    """float64 IEEE operations in the same order on the CPU: the same bits, lambda rounded up."""
    kernel_backend = TritonBackend() if backend == "triton" else NativeBackend()
    gen = torch.Generator().manual_seed(11)
    cfg = SurgeryConfig(tolerance=0.1, max_norm=max_norm)
    cases = [_random_terms(gen) for _ in range(6)]
    bad = _random_terms(gen)
    bad[contract.TERM_K1] = float("nan")
    cases += [bad, torch.zeros(contract.TERMS_LEN, dtype=torch.float64)]
    for i, terms in enumerate(cases):
        found = torch.tensor([1.0 if i == 2 else 0.0])
        got = kernel_backend.update_space_coefficients(terms, cfg, 0.01, found)
        want = coef_torch.update_space_coefficients(terms, cfg, 0.01, found)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"case {i}: {got} != {want}")
        assert got.dtype == torch.float32 and got.shape == (contract.COEF_LEN,)
        skip = got[contract.SKIP].item()
        assert skip == (1.0 if i in (2, 6) else 0.0)
        if not skip:  # cb is lambda*clip rounded up: the constraint holds for the float32 value
            assert got[contract.CB].double() >= got[contract.LAM].double() * got[contract.CLIP].double() * (1 - 1e-7)


# ------------------------------------------------------------------------------ routing


def test_a_backend_without_update_space_kernels_is_refused_by_name_and_skipped_on_auto(monkeypatch):
    monkeypatch.setattr(TorchBackend, "supports_update_space", lambda self, device: False)
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(NotImplementedError, match=r"surgery_space='update'.*backend='torch'"):
        EUPMU(p, mode="explicit", surgery_space="update", backend="torch")
    EUPMU(p, mode="explicit", surgery_space="gradient", backend="torch")  # gradient space is unaffected


@pytest.mark.skipif(not HAVE_NATIVE, reason="the extension is not built")
def test_auto_takes_the_native_kernels_on_cpu_in_update_space():
    tensors = random_problem("adamw", [5], torch.float32, 1, 2, 2.0)
    params, opt = step_on("auto", "adamw", tensors, 2, 0.0)
    assert {opt._step_backend(b).name for b in opt.buckets} == {"native"}
    _, twin = step_on("torch", "adamw", tensors, 2, 0.0)
    assert opt.stats()["lambda"].item() == pytest.approx(twin.stats()["lambda"].item(), rel=1e-5)


def test_update_space_terms_have_the_contract_slots():
    assert contract.TERM_SLOTS[:3] == ("aa", "ab", "bb") and contract.TERMS_LEN == len(contract.TERM_SLOTS)
    header = contract.c_header()
    for i, slot in enumerate(contract.TERM_SLOTS):
        assert f"kTerm{slot.capitalize()} = {i};" in header
    assert f"kClipIterations = {contract.CLIP_ITERATIONS};" in header
