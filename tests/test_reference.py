"""The float64 reference checked against hand-derived cases and against torch.optim."""

import math

import pytest
import torch

from eupmu_kernels import reference as ref


def test_ungrad_lambda_only_when_conflicting():
    g_f = torch.tensor([1.0, 0.0])
    g_r = torch.tensor([-1.0, 1.0])  # <g_f,g_r> = -1, ||g_r||^2 = 2
    assert ref.ungrad_lambda(ref.gramian(g_f, g_r), 0.0) == pytest.approx(0.5)
    d = ref.ungrad(g_f, g_r)
    assert float(d @ g_r.double()) == pytest.approx(0.0, abs=1e-15)
    # no conflict: g_f untouched
    assert torch.equal(ref.ungrad(g_f, torch.tensor([1.0, 1.0])), g_f.double())


def test_ungrad_tolerance_leaves_slack():
    g_f = torch.tensor([1.0, 0.0])
    g_r = torch.tensor([-1.0, 1.0])
    d = ref.ungrad(g_f, g_r, eps=0.25)
    assert float(d @ g_r.double()) == pytest.approx(-0.25)
    assert torch.equal(ref.ungrad(g_f, g_r, eps=5.0), g_f.double())


def test_zero_retain_gradient_gives_forget_gradient():
    g_f = torch.randn(11)
    assert torch.equal(ref.ungrad(g_f, torch.zeros(11)), g_f.double())


def test_pcgrad_pair_coefficients_agree_with_explicit_projection():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        g_f, g_r = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
        a, b = ref.pair_coefficients(ref.gramian(g_f, g_r), "pcgrad")
        d = a * g_f.double() + b * g_r.double()
        assert torch.allclose(d, ref.pcgrad(g_f, g_r), rtol=1e-12, atol=1e-12)


def test_graddiff_and_clip_from_gramian():
    g_f, g_r = torch.randn(13), torch.randn(13)
    assert torch.allclose(ref.surgery(g_f, g_r, "graddiff", alpha=0.3), g_f.double() + 0.3 * g_r.double())
    d = ref.surgery(g_f, g_r, "ungrad", max_norm=0.1)
    assert float(d.norm()) == pytest.approx(0.1, rel=1e-4)
    gram = ref.gramian(g_f, g_r)
    a, b = ref.pair_coefficients(gram, "ungrad")
    assert ref.combined_norm(gram, a, b) == pytest.approx(float((a * g_f.double() + b * g_r.double()).norm()))


@pytest.mark.parametrize("rule, torch_cls, hp", [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
])
def test_reference_rules_match_torch_optim(rule, torch_cls, hp):
    p = torch.randn(17, dtype=torch.float64, requires_grad=True)
    opt = torch_cls([p], **hp)
    p_ref = p.detach().clone()
    st = ref.RuleState()
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        g = torch.randn(17, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        p_ref = ref.rule_step(rule, p_ref, g, st, **hp)
    assert torch.allclose(p.detach(), p_ref, rtol=1e-12, atol=1e-14)


def test_dual_rules_signs():
    # retain loss rose by more than the tolerance -> delta < 0 -> w rises
    delta = ref.dual_delta(1.0, 1.5, eps=0.1, scale=1.0)
    assert delta == pytest.approx(-0.4)
    assert ref.paper_dual_update(0.0, delta, beta=2.0) == pytest.approx(0.8)
    # improving -> w falls, never below zero
    assert ref.paper_dual_update(0.3, ref.dual_delta(1.0, 0.5, 0.0), beta=1.0) == 0.0
    st = ref.AdamScalarState()
    w = ref.reference_dual_update(0.0, 1.0, 2.0, err=0.0, beta=0.1, st=st)
    assert w > 0.0
    with pytest.raises(ValueError, match="non-positive"):
        ref.transform(-1.0, "log")


def test_famo_update_moves_weight_towards_slower_task():
    st = ref.FamoState()
    # forget loss improves a lot, retain loss gets worse: weight shifts to the retain task
    ref.famo_update(st, [1.0, 1.0], [0.5, 1.2])
    z = ref.famo_weights(st)
    assert z[1] > z[0]
    assert math.isfinite(ref.famo_objective([0.5, 1.2], st))
