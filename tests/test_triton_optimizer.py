"""``EUPMU(..., backend="triton")`` follows the same trajectory as ``backend="torch"``."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel, flat64

from eupmu_kernels import EUPMU
from eupmu_kernels.backends.triton_backend import TritonBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (TritonBackend().available() and TritonBackend().supports(DEVICE, torch.float32)),
                                reason="triton is not installed, or CPU tensors without TRITON_INTERPRET=1")

@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """The tensors here are tiny: more intra-op threads only add contention on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


STEPS = 20
RULES = {
    "sgd_momentum": dict(rule="sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov": dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": dict(rule="adam", lr=1e-2, weight_decay=1e-2),
    "adamw": dict(rule="adamw", lr=1e-2, weight_decay=1e-1, max_grad_norm=0.5),
}


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Odd sizes: a 5400-element weight spans a full (fast) block and a tail, and the retain-buffer
    views after the first layer are not 16-byte aligned (general path)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 600), torch.nn.Tanh(),
                               torch.nn.Linear(600, 3)).to(device=DEVICE, dtype=dtype)


def losses(model: torch.nn.Module, step: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x_f = torch.randn(8, 5, generator=gen).to(DEVICE, dtype)
    x_r = torch.randn(16, 5, generator=gen).to(DEVICE, dtype)
    y_f = torch.randint(0, 3, (8,), generator=gen).to(DEVICE)
    y_r = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)
    ce = torch.nn.functional.cross_entropy
    return -ce(model(x_f).float(), y_f), ce(model(x_r).float(), y_r)


def explicit_step(model, opt, step: int, dtype: torch.dtype = torch.float32) -> None:
    opt.zero_grad()
    forget, retain = losses(model, step, dtype)
    retain.backward()
    opt.stash_retain_grad()
    forget.backward()
    opt.step()


def implicit_step(model, opt, step: int) -> float:
    """One step and its exact dual update; returns the retain loss after the step that drove it."""
    opt.zero_grad()
    opt.combine(*losses(model, step)).backward()
    opt.step()
    with torch.no_grad():
        retain_after = losses(model, step)[1]
    opt.update_dual(retain_after)
    return retain_after.item()


def twin_optimizers(model_kwargs: dict, **kwargs):
    model = make_model(**model_kwargs)
    twin = copy.deepcopy(model)
    ours = EUPMU(model.parameters(), backend="triton", **kwargs)
    theirs = EUPMU(twin.parameters(), backend="torch", **kwargs)
    return model, ours, twin, theirs


# One step from identical states differs only by float32 rounding: a few roundings per element
# (direction, decay, moments, square root, division, update), each at most u = 2^-24 relative,
# measured as a norm over all elements. 16u leaves room for the operation count, not for drift:
# every step below starts from the torch backend's state (see `resync`), so errors cannot pile up.
STEP_RTOL = 16 * 2.0**-24


def assert_same_state(ours: EUPMU, theirs: EUPMU, rtol: float) -> None:
    """Each state key over all parameters, as one vector (tiny tensors alone are too noisy)."""
    pairs = list(zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]))
    for key in theirs.state[pairs[0][1]]:
        mine = flat64([ours.state[p][key].cpu() for p, _ in pairs])
        want = flat64([theirs.state[q][key].cpu() for _, q in pairs])
        assert_close_rel(mine, want, rtol, key)


@torch.no_grad()
def resync(model, ours: EUPMU, twin, theirs: EUPMU) -> None:
    """Start the next step of the Triton run from the torch run's parameters, state and multiplier."""
    for p, q in zip(model.parameters(), twin.parameters()):
        p.copy_(q)
        for key, value in theirs.state[q].items():
            ours.state[p][key].copy_(value)
    if theirs.dual.state is not None:
        ours.dual.state.load(theirs.dual.state.to_dict())


@pytest.mark.parametrize("key", list(RULES))
def test_explicit_ungrad_matches_torch_backend(key):
    model, ours, twin, theirs = twin_optimizers({}, mode="explicit", tolerance=0.0, **RULES[key])
    surgery_steps = 0
    for step in range(STEPS):
        explicit_step(model, ours, step)
        explicit_step(twin, theirs, step)
        surgery_steps += int(theirs.stats()["lambda"].item() > 0)
        assert_close_rel(flat64(model.parameters()).cpu(), flat64(twin.parameters()).cpu(), STEP_RTOL, f"step {step}")
        assert_same_state(ours, theirs, STEP_RTOL)
        # lambda* from float64 Gramians of the same gradients: equal up to the float32 rounding of lambda
        torch.testing.assert_close(ours.stats()["lambda"], theirs.stats()["lambda"], rtol=4 * 2.0**-24, atol=0)
        resync(model, ours, twin, theirs)
    assert surgery_steps > 0  # the constraint was active: surgery itself was compared


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_implicit_mode_matches_torch_backend(rule):
    kwargs = dict(rule=rule, lr=0.02, mode="implicit", dual="paper", dual_lr=0.5, tolerance=0.01, w_init=0.5)
    if rule == "sgd":
        kwargs.update(momentum=0.9, max_grad_norm=1.0)
    model, ours, twin, theirs = twin_optimizers({}, **kwargs)
    for step in range(STEPS):
        r_ours = implicit_step(model, ours, step)
        r_theirs = implicit_step(twin, theirs, step)
        assert_close_rel(flat64(model.parameters()).cpu(), flat64(twin.parameters()).cpu(), STEP_RTOL, f"step {step}")
        assert_same_state(ours, theirs, STEP_RTOL)
        # From the same state, w moves by -beta * ((L_r(t) - L_r(t+1)) / lr + eps): the two runs differ only
        # through L_r(t+1), which the float32 rounding of theta_{t+1} moved by |r_ours - r_theirs|
        explained = kwargs["dual_lr"] * abs(r_ours - r_theirs) / kwargs["lr"]
        assert abs(ours.w.item() - theirs.w.item()) <= explained * (1 + 1e-3) + 8 * 2.0**-24 * abs(theirs.w.item())
        resync(model, ours, twin, theirs)


def test_nonfinite_gradient_skips_the_whole_step():
    model, ours, _, _ = twin_optimizers({}, mode="explicit", rule="adamw", lr=1e-2)
    explicit_step(model, ours, 0)
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in ours.state[p].items()}
    ours.zero_grad()
    forget, retain = losses(model, 1)
    retain.backward()
    ours.stash_retain_grad()
    forget.backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    ours.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in ours.state[p].items()}
    assert after.keys() == state.keys() and len(state) == 3 * len(params)
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert ours.stats()["skipped"].item() == 1.0


def test_bf16_params_with_fp32_state_follow_torch_backend():
    model, ours, twin, theirs = twin_optimizers({"dtype": torch.bfloat16}, mode="explicit", rule="adamw", lr=1e-2,
                                                state_dtype=torch.float32)
    for step in range(3):
        explicit_step(model, ours, step, torch.bfloat16)
        explicit_step(twin, theirs, step, torch.bfloat16)
    assert all(v.dtype == torch.float32 for p in model.parameters() for v in ours.state[p].values())
    # bf16 stores round differently (the interpreter truncates): a few ulps after three steps
    assert_close_rel(flat64(model.parameters()).cpu(), flat64(twin.parameters()).cpu(), 3e-2, "bf16 params")
