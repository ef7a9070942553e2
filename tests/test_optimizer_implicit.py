"""EUPMU implicit mode (one backward pass, a dual multiplier on the device)."""

import math

import pytest
import torch
from fixtures import flat64

from eupmu_kernels import EUPMU
from eupmu_kernels import reference as ref


def quadratic_problem(seed=0):
    """L_f and L_r as quadratics of one parameter vector: easy to reason about."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5, generator=gen))
    target_f = torch.randn(5, generator=gen)
    target_r = torch.randn(5, generator=gen)

    def losses():
        return ((p - target_f) ** 2).sum() + 0.1, ((p - target_r) ** 2).sum() + 0.1

    return p, losses


def test_objective_is_weighted_sum_and_w_is_detached():
    p, losses = quadratic_problem()
    assert EUPMU([p], mode="implicit").dual_config.rule == "reference"  # the default preset
    opt = EUPMU([p], lr=0.1, mode="implicit", dual="paper", w_init=0.5, backend="torch")
    f, r = losses()
    j = opt.combine(f, r)
    assert j.item() == pytest.approx(f.item() + 0.5 * r.item())
    j.backward()
    g_expected = torch.autograd.grad(losses()[0] + 0.5 * losses()[1], [p])[0]
    assert torch.allclose(p.grad, g_expected)
    assert not opt.w.requires_grad and opt.w.device == p.device
    opt_n = EUPMU([p], lr=0.1, mode="implicit", dual="paper", w_init=0.5, weighting="normalised", backend="torch")
    assert opt_n.combine(f, r).item() == pytest.approx((f.item() + 0.5 * r.item()) / 1.5)
    opt_log = EUPMU([p], lr=0.1, mode="implicit", dual="paper", w_init=2.0, loss_transform="log", backend="torch")
    assert opt_log.combine(f, r).item() == pytest.approx(math.log(f.item() + 1e-8) + 2 * math.log(r.item() + 1e-8))


def test_step_with_zero_weight_matches_torch_adamw():
    p, losses = quadratic_problem()
    q, losses_q = quadratic_problem()  # same targets, separate parameter
    ours = EUPMU([p], lr=0.05, mode="implicit", dual="paper", dual_lr=0.0, backend="torch")
    theirs = torch.optim.AdamW([q], lr=0.05)
    for _ in range(20):
        ours.zero_grad()
        ours.combine(*losses()).backward()  # w = 0 and frozen: J = L_f
        ours.step()
        theirs.zero_grad()
        losses_q()[0].backward()
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_matches_clip_grad_norm():
    p, losses = quadratic_problem()
    q, losses_q = quadratic_problem()
    ours = EUPMU([p], lr=0.1, rule="sgd", mode="implicit", dual="paper", w_init=1.0, dual_lr=0.0, max_grad_norm=0.3,
                 backend="torch")
    theirs = torch.optim.SGD([q], lr=0.1)
    for _ in range(5):
        ours.zero_grad()
        ours.combine(*losses()).backward()
        ours.step()
        theirs.zero_grad()
        f, r = losses_q()
        (f + r).backward()
        torch.nn.utils.clip_grad_norm_([q], 0.3)
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ours.stats()["clip"].item() < 1.0


def test_paper_dual_rule_sign_exact_update():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, rule="sgd", mode="implicit", dual="paper", dual_lr=0.5, tolerance=0.2,
                backend="torch")
    f, r = losses()
    opt.combine(f, r).backward()
    opt.step()
    # retain loss rose by 0.3 (more than tolerance*lr = 0.02): w must rise
    opt.update_dual(r.detach() + 0.3)
    expected = ref.paper_dual_update(0.0, ref.dual_delta(r.item(), r.item() + 0.3, 0.2, scale=0.1), 0.5)
    assert expected > 0 and opt.w.item() == pytest.approx(expected, rel=1e-5)
    # now improving steadily: w falls back to exactly zero and stays there
    for _ in range(5):
        opt.zero_grad()
        f, r = losses()
        opt.combine(f, r).backward()
        opt.step()
        opt.update_dual(r.detach() - 0.5)
        assert opt.w.item() >= 0.0
    assert opt.w.item() == 0.0


def test_lagged_dual_update_uses_next_retain_loss():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, rule="sgd", mode="implicit", dual="paper", dual_lr=1.0, backend="torch")
    w = 0.0
    r_prev = None
    for _ in range(6):
        opt.zero_grad()
        f, r = losses()
        if r_prev is not None:
            w = ref.paper_dual_update(w, ref.dual_delta(r_prev, r.item(), 0.0, scale=0.1), 1.0)
        opt.combine(f, r).backward()
        assert opt.w.item() == pytest.approx(w, rel=1e-5, abs=1e-7)
        opt.step()
        r_prev = r.item()


def test_reference_preset_matches_published_rule():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, rule="sgd", momentum=0.9, weight_decay=5e-4, mode="implicit", dual="reference",
                dual_lr=0.5, tolerance=-0.01, backend="torch")
    assert opt.dual_config.psi == "log" and not opt.dual_config.scale_by_lr
    st = ref.AdamScalarState()
    w = 0.0
    for _ in range(6):
        opt.zero_grad()
        f, r = losses()
        opt.combine(f, r).backward()
        opt.step()
        with torch.no_grad():
            r_after = losses()[1]
        opt.update_dual(r_after)
        w = ref.reference_dual_update(w, r.item(), r_after.item(), err=0.01, beta=0.5, st=st)
        assert opt.w.item() == pytest.approx(w, rel=1e-4, abs=1e-6)


def test_famo_matches_reference():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.05, rule="sgd", mode="implicit", dual="famo", backend="torch")
    st = ref.FamoState()
    for _ in range(5):
        opt.zero_grad()
        f, r = losses()
        j = opt.combine(f, r)
        assert j.item() == pytest.approx(ref.famo_objective([f.item(), r.item()], st), rel=1e-5)
        j.backward()
        opt.step()
        with torch.no_grad():
            f1, r1 = losses()
        opt.update_dual(r1, f1)
        ref.famo_update(st, [f.item(), r.item()], [f1.item(), r1.item()])
    z = torch.softmax(opt.dual.state.logits, 0)
    assert torch.allclose(z.double(), torch.tensor(ref.famo_weights(st), dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="forget loss after the step"):
        opt.zero_grad()
        opt.combine(*losses()).backward()
        opt.step()
        opt.update_dual(losses()[1])


def test_log_transform_rejects_non_positive_loss():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, mode="implicit", loss_transform="log", backend="torch")
    f, r = losses()
    with pytest.raises(ValueError, match="log of a non-positive"):
        opt.combine(-f, r)  # a gradient-ascent forget loss is negative


def test_nonfinite_combined_gradient_is_skipped():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, mode="implicit", backend="torch")
    before = p.detach().clone()
    opt.combine(*losses()).backward()
    p.grad[2] = float("nan")
    opt.step()
    assert torch.equal(p.detach(), before) and opt.stats()["skipped"].item() == 1.0


def test_implicit_without_checks_has_no_reduction():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, mode="implicit", skip_nonfinite=False, backend="torch")
    opt.combine(*losses()).backward()
    opt.step()
    assert "gramian" not in opt.stats()
    assert flat64([p]).isfinite().all()


def test_w_max_caps_the_multiplier():
    p, losses = quadratic_problem()
    opt = EUPMU([p], lr=0.1, rule="sgd", mode="implicit", dual="paper", dual_lr=10.0, w_max=2.0, backend="torch")
    opt.combine(*losses()).backward()
    opt.step()
    opt.update_dual(losses()[1].detach() + 5.0)  # a large retain increase pushes w up hard
    assert opt.w.item() == 2.0
