"""What only the native backend has: the compiled extension eupmu_kernels._C (C++ CPU kernels here, CUDA
kernels on a GPU machine), its build, its CPU kernel variants, per-tensor Gramian rows, layouts it
hands back, and the CUDA-only checks (tests marked gpu run the CUDA kernels).

Everything of the kernel contract itself (Gramian, coefficient stage, combine, fused step, skips,
the numerical range, the optimizer's step) is checked for every backend, the native one included,
in tests/test_contract.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from fixtures import (SIZE_CASES, U32, assert_close_rel, flat64, make_tensors, range_truth, tiny_forget_pair,
                      wide_range_pair)
from torch import Tensor

from eupmu_kernels import EUPMU, contract
from eupmu_kernels import reference as ref
from eupmu_kernels.backends.native_backend import NativeBackend, extension_error, load_extension
from eupmu_kernels.backends.torch_backend import TorchBackend
from eupmu_kernels.contract import (CA, CB, COEF_LEN, COS, LAM, SKIP, RuleStateLists, StepHyper, rule_codes,
                                    surgery_codes)

METHOD_CODE = surgery_codes()
RULE_CODE = rule_codes()

EXT = load_extension()
REQUIRED = os.environ.get("EUPMU_REQUIRE_EXT") == "1"

# two intra-op threads: enough to exercise the CPU kernels' parallel split, no more (the machine is shared)
pytestmark = [pytest.mark.skipif(EXT is None and not REQUIRED, reason="eupmu_kernels._C is not built"),
              pytest.mark.threads(2)]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
RULES = {
    "sgd": ("sgd", StepHyper(lr=0.05, weight_decay=0.01)),
    "sgd_nesterov": ("sgd", StepHyper(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening": ("sgd", StepHyper(lr=0.05, momentum=0.8, dampening=0.3)),
    "adam": ("adam", StepHyper(lr=0.05, weight_decay=0.01)),
    "adamw": ("adamw", StepHyper(lr=0.05, weight_decay=0.1)),
    "adamw_betas": ("adamw", StepHyper(lr=0.02, beta1=0.6, beta2=0.9, eps=1e-6, weight_decay=0.0)),
}
def to(tensors: list[Tensor], device: str) -> list[Tensor]:
    return [t.to(device) for t in tensors]


def coef_vector(ca: float, cb: float, skip: float = 0.0, device: str = "cpu") -> Tensor:
    coef = torch.zeros(COEF_LEN, dtype=torch.float32)
    coef[CA], coef[CB], coef[SKIP] = ca, cb, skip
    return coef.to(device)


# ------------------------------------------------------------------------------ build and import


def test_extension_imports():
    if EXT is None:
        pytest.fail(f"EUPMU_REQUIRE_EXT=1 but eupmu_kernels._C does not import: {extension_error()}")
    backend = NativeBackend()
    assert backend.available() and backend.name == "native"
    assert backend.supports(torch.device("cpu"), torch.float32)
    assert backend.supports(torch.device("cpu"), torch.bfloat16)
    assert not backend.supports(torch.device("cpu"), torch.float64)
    assert EXT.cpu_isa() in EXT.cpu_isas() and "default" in EXT.cpu_isas()


def test_cuda_kernels_are_reported_as_built():
    """has_cuda_kernels() says what the build compiled in (read independently from the binary:
    the CUDA kernels' names are in it exactly when they were compiled), and CUDA tensors are
    taken only then."""
    built = EXT.has_cuda_kernels()
    assert isinstance(built, bool)
    with open(EXT.__file__, "rb") as fh:
        assert built == (b"gram_chunks_kernel" in fh.read())
    if torch.version.cuda is None:
        assert not built  # a CPU-only torch cannot have built them
    assert NativeBackend().supports(torch.device("cuda"), torch.float16) == (built and torch.cuda.is_available())


def test_compiled_codes_are_the_python_ones():
    """The slots and codes the kernels were compiled with (the generated eupmu_contract.h) are
    those of the Python registries."""
    codes = EXT.contract_codes()
    assert codes["coef_len"] == contract.COEF_LEN
    assert codes["slots"] == {name: i for i, name in enumerate(contract.COEF_SLOTS)}
    assert codes["clip_eps"] == contract.CLIP_EPS
    assert codes["methods"] == contract.surgery_codes() and codes["method_count"] == len(codes["methods"])
    assert codes["rules"] == contract.rule_codes() and codes["rule_count"] == len(codes["rules"])


# ------------------------------------------------------------------------------ Gramian


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_is_deterministic(device):
    a = to(make_tensors(SIZE_CASES["many_small_plus_large"] + [(300_001,)], seed=3), device)
    b = to(make_tensors(SIZE_CASES["many_small_plus_large"] + [(300_001,)], seed=4), device)
    first = EXT.gramian(a, b)
    assert all(torch.equal(first, EXT.gramian(a, b)) for _ in range(3))
    if device == "cpu":  # the chunking, not the thread count, fixes the summation order
        torch.set_num_threads(1)
        try:
            assert torch.equal(first, EXT.gramian(a, b))
        finally:
            torch.set_num_threads(2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_b", [True, False])
def test_per_tensor_rows_are_each_tensors_own_gramian(device, with_b):
    """Row i of gramian(..., per_tensor=True) is bit for bit what tensor i alone gives (the slot the
    backward-pass hook fills), empty tensors give zero rows; 200 tensors and a 300k-element one take
    several launches and several chunks on either device."""
    shapes = [(3 + i % 11,) for i in range(200)] + [(0,), (300_001,), (7, 5)]
    a = to(make_tensors(shapes, dtype=torch.bfloat16, seed=70), device)
    b = to(make_tensors(shapes, dtype=torch.bfloat16, seed=71), device) if with_b else None
    rows = EXT.gramian(a, b, per_tensor=True)
    assert rows.shape == (len(a), 3) and rows.dtype == torch.float64 and rows.device.type == device
    for i in range(len(a)):
        assert torch.equal(rows[i], EXT.gramian([a[i]], None if b is None else [b[i]])), i
    assert torch.equal(rows[200], torch.zeros(3, dtype=torch.float64, device=device))
    torch.testing.assert_close(rows.sum(0), EXT.gramian(a, b), rtol=1e-12, atol=0)
    if not with_b:
        assert not rows[:, 1:].any()


def test_gramian_handles_mixed_layouts_and_empty_tensors():
    a = make_tensors([(40, 30), (0,), (5, 7)], seed=7)
    b = make_tensors([(30, 40), (0,), (7, 5)], seed=8)
    a_views = [a[0].t(), a[1], a[2]]  # a non-contiguous tensor paired with a contiguous one
    b_views = [b[0], b[1], b[2].t()]
    g = EXT.gramian(a_views, b_views)
    flat_a = torch.cat([t.reshape(-1).double() for t in a_views])
    flat_b = torch.cat([t.reshape(-1).double() for t in b_views])
    torch.testing.assert_close(g, ref.gramian(flat_a, flat_b), rtol=1e-12, atol=0)


# The numerical range on every CPU kernel variant (the contract table checks the one this CPU picks):
# float64 products and sums give the stored values' Gramian to ~1e-13; lambda and cos are then float32
# slots (one rounding); 2 u32 bounds their error.


def check_range_case(device, f, r, what):
    want = range_truth(f, r)
    gram = EXT.gramian(to(f, device), to(r, device)).cpu()
    assert gram.dtype == torch.float64
    for k, name in enumerate(("aa", "ab", "bb")):
        assert gram[k].item() == pytest.approx(want[name], rel=1e-12), (what, name)
    coef = EXT.coefficients(gram.to(device), METHOD_CODE["ungrad"], 0.0, 1.0, None, None, None).cpu().double()
    assert coef[SKIP].item() == 0.0, what
    assert coef[LAM].item() == pytest.approx(want["lam"], rel=2 * U32), what
    assert coef[CB].item() == pytest.approx(want["lam"], rel=2 * U32), what
    assert coef[COS].item() == pytest.approx(want["cos"], rel=2 * U32), what
    return coef


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_range_cases_on_every_cpu_kernel_variant(isa):
    if isa not in EXT.cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    EXT.set_cpu_isa(isa)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_range_case("cpu", *wide_range_pair(dtype), f"{isa} {dtype} wide range")
        check_range_case("cpu", *tiny_forget_pair(torch.float32, 1e-5), f"{isa} tiny")
    finally:
        EXT.set_cpu_isa("auto")


# ------------------------------------------------------------------------------ combine


def test_combine_writes_back_into_non_dense_gradients():
    base = make_tensors([(20, 16)], seed=12)[0]
    g_f = base[:, ::2]  # a strided view: the kernel works on a copy and writes it back
    g_r = make_tensors([(20, 8)], seed=13)[0]
    expected = 2.0 * g_f.double() + 0.5 * g_r.double()
    EXT.combine_([g_f], [g_r], coef_vector(2.0, 0.5))
    torch.testing.assert_close(g_f.double(), expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ fused update


def make_state(rule: str, hp: StepHyper, params: list[Tensor], state_dtype: torch.dtype, step0: float,
               seed: int) -> RuleStateLists:
    gen = torch.Generator().manual_seed(seed)

    def rand_like(p: Tensor, scale: float, positive: bool = False) -> Tensor:
        x = torch.rand(p.shape, generator=gen, dtype=torch.float64) if positive else \
            torch.randn(p.shape, generator=gen, dtype=torch.float64)
        return (x * scale).to(state_dtype)

    st = RuleStateLists(step=[torch.tensor(step0) for _ in params])
    if rule != "sgd":
        st.exp_avg = [rand_like(p, 0.1) if step0 else torch.zeros_like(p, dtype=state_dtype) for p in params]
        st.exp_avg_sq = [rand_like(p, 0.01, True) if step0 else torch.zeros_like(p, dtype=state_dtype) for p in params]
    elif hp.momentum != 0:
        st.momentum_buffer = [rand_like(p, 0.1) for p in params]
    return st


@pytest.mark.parametrize("device", DEVICES)
def test_step_hands_back_parameters_it_cannot_take(device):
    """A state in another layout or dtype than its parameter is handed back (the backend then uses
    the torch path for it); a gradient in another layout is copied instead."""
    shapes = [(6, 5, 4, 3), (7,), (33, 9)]
    hp = StepHyper(lr=0.05, weight_decay=0.01)
    coef = coef_vector(1.0, 0.0, device=device)

    def setup() -> tuple[list[Tensor], list[Tensor], RuleStateLists]:
        params = to(make_tensors(shapes, seed=40), device)
        params[0] = params[0].contiguous(memory_format=torch.channels_last)  # its state stays contiguous
        grads = to(make_tensors(shapes, seed=41), device)
        grads[2] = grads[2].t().contiguous().t()
        st = RuleStateLists(step=[torch.tensor(2.0, device=device) for _ in shapes],
                            exp_avg=[torch.full(s, 0.1, device=device) for s in shapes],
                            exp_avg_sq=[torch.full(s, 0.01, device=device) for s in shapes])
        st.exp_avg_sq[1] = st.exp_avg_sq[1].double()
        return params, grads, st

    params, grads, st = setup()
    before = [p.clone() for p in params]
    left = EXT.step_(RULE_CODE["adam"], params, grads, None, st.step, st.exp_avg, st.exp_avg_sq, [], coef,
                     hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, 0.0, 0.0, False)
    assert left == [0, 1]
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert not torch.equal(params[2], before[2])

    ours, theirs = setup(), setup()
    NativeBackend().step_("adam", ours[0], ours[1], None, ours[2], coef, hp)
    TorchBackend().step_("adam", theirs[0], theirs[1], None, theirs[2], coef, hp)
    mine_all = ours[0] + ours[2].exp_avg_sq + ours[2].step
    for mine, want in zip(mine_all, theirs[0] + theirs[2].exp_avg_sq + theirs[2].step):
        torch.testing.assert_close(mine, want, rtol=1e-6, atol=1e-7)
    assert ours[0][0].is_contiguous(memory_format=torch.channels_last)


def test_cpu_kernel_variants_agree():
    shapes = SIZE_CASES["many_small_plus_large"]
    results = {}
    for isa in EXT.cpu_isas():
        EXT.set_cpu_isa(isa)
        try:
            params = make_tensors(shapes, torch.bfloat16, seed=50)
            g_f, g_r = make_tensors(shapes, torch.bfloat16, seed=51), make_tensors(shapes, torch.bfloat16, seed=52)
            gram = EXT.gramian(g_f, g_r)
            st = make_state("adamw", RULES["adamw"][1], params, torch.float32, 3.0, seed=53)
            hp = RULES["adamw"][1]
            EXT.step_(RULE_CODE["adamw"], params, g_f, g_r, st.step, st.exp_avg, st.exp_avg_sq, [],
                      coef_vector(1.0, 0.5), hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, 0.0, 0.0, False)
            results[isa] = (gram, flat64(params), flat64(st.exp_avg_sq))
        finally:
            EXT.set_cpu_isa("auto")
    base = results["default"]
    for isa, (gram, p, v) in results.items():
        # exact products: only the float64 summation order differs between variants
        torch.testing.assert_close(gram, base[0], rtol=1e-12, atol=0, msg=isa)
        assert_close_rel(p, base[1], 8e-3, isa)
        assert_close_rel(v, base[2], 1e-5, isa)


# ------------------------------------------------------------------------------ the optimizer

OPTIMIZER_CONFIGS = {
    "sgd_nesterov": dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd": dict(rule="sgd", lr=0.05),
    "adam": dict(rule="adam", lr=2e-3, weight_decay=1e-3),
    "adamw": dict(rule="adamw", lr=2e-3),
}


def train(backend: str, device: str, mode: str, config: dict, steps: int = 20,
          dtype: torch.dtype = torch.float32, **extra) -> tuple[torch.nn.Module, EUPMU]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device, dtype)
    # dual="paper": the forget loss below is negative (gradient ascent), which the log transform
    # of the default preset refuses
    opt = EUPMU(model.named_parameters(), mode=mode, backend=backend, tolerance=0.01, dual="paper", **config, **extra)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=gen).to(device, dtype)
    y_f = torch.randint(0, 4, (64,), generator=gen).to(device)
    y_r = torch.randint(0, 4, (64,), generator=gen).to(device)
    for _ in range(steps):
        opt.zero_grad()
        forget = -torch.nn.functional.cross_entropy(model(x[:32]).float(), y_f[:32])
        retain = torch.nn.functional.cross_entropy(model(x[32:]).float(), y_r[32:])
        if mode == "explicit":
            retain.backward()
            opt.stash_retain_grad()
            forget.backward()
        else:
            opt.combine(forget, retain).backward()
        opt.step()
    return model, opt


def test_writes_bump_autograd_versions():
    p = torch.nn.Parameter(torch.randn(10))
    version = p._version
    st = RuleStateLists(step=[torch.tensor(0.0)])
    NativeBackend().step_("sgd", [p], [torch.randn(10)], None, st, coef_vector(1.0, 0.0), StepHyper(lr=0.1))
    assert p._version > version and st.step[0].item() == 1.0


# ------------------------------------------------------------------------------ CUDA only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_unaligned_views_take_the_element_path(dtype):
    """Views one element into their storage cannot use 16-byte accesses; results must not care."""
    n = 70_001
    storage = [make_tensors([(n + 1,)], dtype, seed=s)[0].cuda() for s in (60, 61, 62)]
    p, g_f, g_r = (t[1:] for t in storage)
    aligned = [t[1:].clone() for t in storage]
    gram = EXT.gramian([g_f], [g_r])
    torch.testing.assert_close(gram, EXT.gramian([aligned[1]], [aligned[2]]), rtol=1e-5, atol=0)
    hp = RULES["adamw"][1]
    for params, gf, gr in (([p], [g_f], [g_r]), ([aligned[0]], [aligned[1]], [aligned[2]])):
        st = RuleStateLists(step=[torch.tensor(0.0, device="cuda")], exp_avg=[torch.zeros_like(params[0])],
                            exp_avg_sq=[torch.zeros_like(params[0])])
        NativeBackend().step_("adamw", params, gf, gr, st, coef_vector(1.0, 0.5, device="cuda"), hp)
    torch.testing.assert_close(p, aligned[0], rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_step_does_not_synchronise():
    model, opt = train("native", "cuda", "explicit", OPTIMIZER_CONFIGS["adamw"], steps=2)
    x = torch.randn(8, 12, device="cuda")
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.stash_retain_grad()
    model(x).mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_step_copies_nothing_to_the_device():
    """The launch metadata travels in the kernel arguments: a steady-state step (explicit, AdamW,
    clipping) issues no host-to-device copy, over more tensors than one launch takes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(40)]).cuda()  # 80 tensors
    opt = EUPMU(model.parameters(), mode="explicit", backend="native", max_grad_norm=1.0, lr=1e-3)
    x = torch.randn(8, 16, device="cuda")

    def iteration():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.stash_retain_grad()
        model(x).mean().backward()

    for _ in range(2):
        iteration()
        opt.step()
    iteration()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "HtoD" in e.name]
    assert copies == [], copies


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_cuda_hooks_and_step_give_the_same_gramian_bits(mode):
    """On the GPU too, the native in-step Gramian (per-tensor rows, then reductions.sum_rows) equals
    the one the backward-pass hooks form, bit for bit."""
    grams = []
    for in_backward in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 3000), torch.nn.Tanh(), torch.nn.Linear(3000, 40),
                                    torch.nn.Tanh(), torch.nn.Linear(40, 4)).cuda()
        opt = EUPMU(model.parameters(), mode=mode, backend="native", gramian_in_backward=in_backward, lr=1e-3,
                    max_grad_norm=1.0, dual="paper")
        x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1)).cuda()
        for _ in range(2):
            opt.zero_grad()
            forget, retain = -model(x[:32]).square().mean(), model(x[32:]).square().mean()
            if mode == "explicit":
                retain.backward()
                opt.stash_retain_grad()
                forget.backward()
            else:
                opt.combine(forget, retain).backward()
            opt.step()
        assert opt.gramian_source == ("backward" if in_backward else "step")
        grams.append(opt.stats()["gramian"].cpu())
    assert torch.equal(grams[0], grams[1]), grams


@pytest.mark.gpu
def test_cuda_tensor_over_two_to_the_31_elements():
    """int64 sizes and offsets: one bf16 tensor of 2^31 + 4099 elements (the last chunk is partial)."""
    n = (1 << 31) + 4099
    if torch.cuda.mem_get_info()[0] < 2 * 2 * n + (1 << 30):
        pytest.skip("not enough free GPU memory")
    a = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    b = torch.full((n,), 2.0, dtype=torch.bfloat16, device="cuda")
    # every partial is an exact integer in float64, so the float64 total is exact
    assert torch.equal(EXT.gramian([a], [b]).cpu(), torch.tensor([float(n), 2.0 * n, 4.0 * n], dtype=torch.float64))
    EXT.combine_([a], [b], coef_vector(0.5, 0.25, device="cuda"))  # 0.5 * 1 + 0.25 * 2 = 1
    EXT.combine_([a], None, coef_vector(2.0, 0.0, device="cuda"))
    for i in (0, (1 << 31) - 1, 1 << 31, n - 1):
        assert a[i].item() == 2.0
    st = RuleStateLists(step=[torch.tensor(0.0, device="cuda")])
    EXT.step_(RULE_CODE["sgd"], [a], [b], None, st.step, [], [], [], coef_vector(1.0, 0.0, device="cuda"),
              0.25, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, False)  # 2 - 0.25 * 2 = 1.5
    for i in (0, (1 << 31) - 1, 1 << 31, n - 1):
        assert a[i].item() == 1.5
    assert st.step[0].item() == 1.0
    del a, b
    torch.cuda.empty_cache()
