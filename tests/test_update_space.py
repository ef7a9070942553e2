"""Update-space surgery: the update the base rule applies keeps <theta_{t+1} - theta_t, g_r> <= lr * eps."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import flat64
from hypothesis import given, settings
from hypothesis import strategies as st

from eupmu_kernels import EUPMU
from eupmu_kernels import reference as ref

RULES = {
    "sgd": dict(rule="sgd", lr=0.1),
    "sgd_momentum": dict(rule="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_dampening": dict(rule="sgd", lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov": dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": dict(rule="adam", lr=1e-2, weight_decay=0.01),
    "adamw": dict(rule="adamw", lr=1e-2, weight_decay=0.1),
}


def reference_hp(kwargs: dict) -> dict:
    """The keyword arguments of reference.rule_step for an EUPMU configuration."""
    return {k: v for k, v in kwargs.items() if k != "rule"}


def random_state(rule: str, n: int, steps: int, gen: torch.Generator) -> ref.RuleState:
    st = ref.RuleState(step=steps)
    if steps and rule == "sgd":
        st.momentum_buffer = torch.randn(n, generator=gen, dtype=torch.float64)
    if steps and rule != "sgd":
        st.exp_avg = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        st.exp_avg_sq = 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)
    return st


def one_step(key: str, seed: int, steps: int, tolerance: float, conflict: float, dtype=torch.float64, **extra):
    """EUPMU update-space step from a random state; returns (theta, theta', g_f, g_r, state, opt)."""
    kwargs = RULES[key]
    gen = torch.Generator().manual_seed(seed)
    n = 37
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    g_r = torch.randn(n, generator=gen, dtype=torch.float64)
    g_f = -conflict * g_r + torch.randn(n, generator=gen, dtype=torch.float64)
    st = random_state(kwargs["rule"], n, steps, gen)
    p = torch.nn.Parameter(theta.clone().to(dtype))
    opt = EUPMU([p], mode="explicit", surgery_space="update", tolerance=tolerance, backend="torch", **kwargs, **extra)
    if steps:
        opt.state[p]["step"] = torch.tensor(float(steps))
        for key_name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            value = getattr(st, key_name)
            if value is not None:
                opt.state[p][key_name] = value.clone().to(dtype)
    opt.zero_grad()
    p.grad = g_r.clone().to(dtype)
    opt.stash_retain_grad()
    p.grad = g_f.clone().to(dtype)
    opt.step()
    return theta, p.detach().to(torch.float64), g_f, g_r, st, opt


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(list(RULES)), seed=st.integers(0, 10_000), steps=st.sampled_from([0, 1, 7]),
       tolerance=st.sampled_from([0.0, 0.01, 1.0]), conflict=st.floats(0.0, 3.0))
def test_first_order_retain_change_stays_within_the_budget(key, seed, steps, tolerance, conflict):
    theta, after, g_f, g_r, st, opt = one_step(key, seed, steps, tolerance, conflict)
    change = float((after - theta) @ g_r)
    lr = RULES[key]["lr"]
    # float64 throughout: rounding of theta' (|theta| 2^-52 per element) bounds the measured change
    rounding = 8 * 2.0**-52 * float(theta.abs() @ g_r.abs())
    assert change <= lr * tolerance + rounding
    measured = opt.stats()["retain_change"].item()
    assert measured == pytest.approx(change, rel=1e-9, abs=rounding)
    # lambda* is the smallest correction that does it: the float64 oracle finds the same one
    expected = ref.update_space_lambda(RULES[key]["rule"], theta, g_f, g_r, st, tolerance, **reference_hp(RULES[key]))
    assert opt.stats()["lambda"].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("key", list(RULES))
def test_update_matches_the_float64_oracle(key):
    theta, after, g_f, g_r, st, opt = one_step(key, 3, 5, 0.0, 2.0)
    lam = opt.stats()["lambda"].item()
    assert lam > 0  # the constraint was active
    expected = ref.rule_step(RULES[key]["rule"], theta, g_f + lam * g_r, copy.deepcopy(st), preconditioner_gradient=g_f,
                             **reference_hp(RULES[key]))
    # lambda* reaches the kernels as a float32 (2^-24 relative): the update's correction term carries that
    torch.testing.assert_close(after, expected, rtol=0, atol=2.0**-24 * float((expected - theta).abs().max()) * 4)


@pytest.mark.parametrize("key", ["sgd_momentum", "adamw"])
def test_float32_storage_keeps_the_budget_up_to_float32_rounding(key):
    theta, after, g_f, g_r, st, opt = one_step(key, 11, 4, 0.0, 2.0, dtype=torch.float32)
    change = float((after - theta.float().double()) @ g_r.float().double())
    rounding = 16 * 2.0**-24 * float(theta.abs() @ g_r.abs())
    assert change <= rounding


@pytest.mark.parametrize("key", ["sgd_momentum", "adamw"])
def test_clipping_in_update_space_meets_the_budget(key):
    theta, after, g_f, g_r, st, opt = one_step(key, 5, 4, 0.0, 2.0, max_grad_norm=0.5)
    assert opt.stats()["clip"].item() < 1.0  # clipping was active
    change = float((after - theta) @ g_r)
    assert change <= 1e-10 * float(theta.abs() @ g_r.abs())


def test_gradient_space_violates_what_update_space_keeps():
    """The reason for the option: with momentum, gradient-space surgery lets the update raise L_r."""
    kwargs = dict(RULES["sgd_momentum"])
    gen = torch.Generator().manual_seed(0)
    n = 20
    g_r = torch.randn(n, generator=gen, dtype=torch.float64)
    results = {}
    for space in ("gradient", "update"):
        p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        opt = EUPMU([p], mode="explicit", surgery_space=space, backend="torch", **kwargs)
        opt.state[p]["step"] = torch.tensor(3.0)
        opt.state[p]["momentum_buffer"] = -2.0 * g_r.clone()  # momentum pointing uphill on L_r
        opt.zero_grad()
        p.grad = g_r.clone()
        opt.stash_retain_grad()
        p.grad = -0.5 * g_r.clone()
        opt.step()
        results[space] = float(p.detach() @ g_r)
    assert results["gradient"] > 0.1  # <theta' - theta, g_r> > 0: the retain loss rises to first order
    assert results["update"] <= 1e-12


def test_update_space_needs_explicit_ungrad():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="surgery_space='update' applies to"):
        EUPMU(p, mode="implicit", surgery_space="update")
    with pytest.raises(ValueError, match="surgery_space='update' applies to"):
        EUPMU(p, mode="explicit", surgery="pcgrad", surgery_space="update")
    with pytest.raises(ValueError, match="surgery_space must be one of"):
        EUPMU(p, mode="explicit", surgery_space="parameter")


def test_grad_scaler_needs_a_prior_unscale_in_update_space():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = EUPMU(model.parameters(), mode="explicit", surgery_space="update", grad_scaler=scaler, backend="torch")
    x = torch.randn(8, 4)
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    opt.stash_retain_grad()
    scaler.scale(-model(x).mean()).backward()
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    twin = torch.nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    opt2 = EUPMU(twin.parameters(), mode="explicit", surgery_space="update", grad_scaler=scaler, backend="torch")
    opt2.zero_grad()
    scaler.scale(twin(x).square().mean()).backward()
    opt2.stash_retain_grad()
    scaler.scale(-twin(x).mean()).backward()
    scaler.unscale_(opt2)
    scaler.step(opt2)
    assert torch.isfinite(opt2.stats()["retain_change"])
    assert flat64(twin.parameters()).ne(flat64(model.parameters())).any()
