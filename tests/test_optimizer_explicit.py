"""EUPMU explicit mode (two backward passes) on the torch backend."""

import copy

import pytest
import torch
from fixtures import explicit_step, flat64, losses, make_model

from eupmu_kernels import EUPMU
from eupmu_kernels import reference as ref

RULES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_plain": (torch.optim.SGD, dict(lr=0.05)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1)),
}


def rule_name(key: str) -> str:
    return key.split("_")[0]


@pytest.mark.parametrize("key", list(RULES))
def test_huge_tolerance_matches_torch_optim_for_20_steps(key):
    torch_cls, hp = RULES[key]
    ours_model, torch_model = make_model(), make_model()
    ours = EUPMU(ours_model.parameters(), rule=rule_name(key), mode="explicit", tolerance=1e30, backend="torch", **hp)
    theirs = torch_cls(torch_model.parameters(), **hp)
    for step in range(20):
        explicit_step(ours_model, ours, step)
        theirs.zero_grad()
        losses(torch_model, step)[0].backward()
        theirs.step()
        assert ours.stats()["lambda"].item() == 0.0
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("surgery, kwargs", [
    ("ungrad", dict(tolerance=0.0)),
    ("ungrad", dict(tolerance=0.05, max_grad_norm=0.2)),
    ("pcgrad", dict()),
    ("graddiff", dict(alpha=0.5)),
])
@pytest.mark.parametrize("key", ["sgd", "adamw"])
def test_trajectory_matches_float64_reference(surgery, kwargs, key):
    _, hp = RULES[key]
    model = make_model(torch.float64)
    opt = EUPMU(model.parameters(), rule=rule_name(key), mode="explicit", surgery=surgery, backend="torch",
                **hp, **kwargs)
    ref_model = copy.deepcopy(model)
    flat = flat64(ref_model.parameters())
    st = ref.RuleState()
    eps, max_norm, alpha = kwargs.get("tolerance", 0.0), kwargs.get("max_grad_norm"), kwargs.get("alpha", 1.0)
    for step in range(8):
        # reference: gradients at the reference parameters, surgery and rule on the flat vector
        forget, retain = losses(ref_model, step, torch.float64)
        g_r = torch.autograd.grad(retain, list(ref_model.parameters()))
        g_f = torch.autograd.grad(forget, list(ref_model.parameters()))
        d = ref.surgery(flat64(g_f), flat64(g_r), surgery, eps=eps, alpha=alpha, max_norm=max_norm)
        flat = ref.rule_step(rule_name(key), flat, d, st, **hp)
        torch.nn.utils.vector_to_parameters(flat.clone(), ref_model.parameters())
        explicit_step(model, opt, step, torch.float64)
        assert torch.allclose(flat64(model.parameters()), flat, rtol=1e-6, atol=1e-8), step


def test_step_satisfies_constraint_on_real_gradients():
    """The applied update (plain SGD: -lr * d) obeys <d, g_r> >= 0, and the constraint was active."""
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", tolerance=0.0, backend="torch")
    active = 0
    for step in range(5):
        opt.zero_grad()
        forget, retain = losses(model, step)
        retain.backward()
        opt.stash_retain_grad()
        forget.backward()
        g_f = flat64([p.grad for p in model.parameters()])
        g_r = flat64(opt.retain_grads())
        before = flat64(model.parameters())
        opt.step()
        d = (before - flat64(model.parameters())) / 0.1  # what the step actually applied
        lam = max(0.0, float(-(g_f @ g_r) / (g_r @ g_r)))  # float64 lambda* of these gradients
        active += lam > 0
        assert torch.allclose(d, g_f + lam * g_r, rtol=1e-5, atol=1e-6)
        # float32 rounding of d (|d_i| u per element) bounds |<d, g_r>| once the conflict is removed
        assert float(d @ g_r) >= -4 * 2.0**-24 * float(d.abs() @ g_r.abs())
    assert active > 0


def test_retain_gradient_is_kept_by_reference():
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", backend="torch")
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # nothing armed, nothing zeroed
    losses(model, 0)[1].backward()
    made = [p.grad for p in model.parameters()]
    opt.stash_retain_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(kept is g for kept, g in zip(opt.retain_grads(), made))  # the very tensors autograd made
    assert all(b.retain is None for b in opt.buckets)  # and no buffer


def test_retain_gradient_is_captured_without_copy_in_views():
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", backend="torch", retain_capture="views")
    opt.zero_grad()
    buffers = [b.retain for b in opt.buckets]
    total = sum(b.numel() for b in buffers)
    numel = sum(p.numel() for p in model.parameters())
    assert numel <= total <= numel + 4 * len(list(model.parameters()))  # one gradient-sized buffer (+ alignment)
    for p in model.parameters():
        base = p.grad._base if p.grad._base is not None else p.grad
        assert any(base is buf for buf in buffers), "grad should be a view of the retain buffer"
    _, retain = losses(model, 0)
    retain.backward()
    expected = torch.autograd.grad(losses(model, 0)[1], list(model.parameters()))
    opt.stash_retain_grad()
    assert all(p.grad is None for p in model.parameters())
    assert torch.allclose(flat64(opt.retain_grads()), flat64(expected))
    assert opt.buckets[0].retain is buffers[0]  # no new buffer


@pytest.mark.parametrize("capture", ["copy", "reference", "views"])
def test_stash_copies_when_grads_were_reset_and_accumulates(capture):
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", backend="torch", retain_capture=capture)
    model.zero_grad()
    g1 = torch.autograd.grad(losses(model, 0)[1], list(model.parameters()))
    g2 = torch.autograd.grad(losses(model, 1)[1], list(model.parameters()))
    for g in (g1, g2):
        for p, gi in zip(model.parameters(), g):
            p.grad = gi.clone()
        opt.stash_retain_grad()
    assert torch.allclose(flat64(opt.retain_grads()), flat64(g1) + flat64(g2))


@pytest.mark.parametrize("capture", ["copy", "reference", "views"])
def test_retain_grad_context_allows_interleaved_micro_batches(capture):
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", backend="torch", retain_capture=capture)
    opt.zero_grad()
    expected_r = expected_f = 0
    for mb in range(3):
        forget, retain = losses(model, mb)
        with opt.retain_grad():
            retain.backward()
        forget.backward()
        f2, r2 = losses(model, mb)
        expected_r = expected_r + flat64(torch.autograd.grad(r2, list(model.parameters())))
        expected_f = expected_f + flat64(torch.autograd.grad(f2, list(model.parameters())))
    assert torch.allclose(flat64(opt.retain_grads()), expected_r, atol=1e-6)
    assert torch.allclose(flat64([p.grad for p in model.parameters()]), expected_f, atol=1e-6)
    opt.step()


def test_parameter_missing_from_one_objective_counts_as_zero():
    a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = EUPMU([a, b], lr=0.1, rule="sgd", mode="explicit", backend="torch", retain_capture="copy")
    retain = (a.sum() - b.sum()) ** 2  # both
    forget = -(a**2).sum()  # only a
    a0, b0 = a.detach().clone(), b.detach().clone()
    g_r = torch.autograd.grad(retain, [a, b], retain_graph=True)
    g_f = [torch.autograd.grad(forget, [a], retain_graph=True)[0], torch.zeros(3, dtype=torch.float64)]
    opt.zero_grad()
    retain.backward()
    opt.stash_retain_grad()
    forget.backward()
    assert b.grad is None
    opt.step()
    d = ref.surgery(flat64(g_f), flat64(g_r))
    assert torch.allclose(torch.cat([a.detach(), b.detach()]), torch.cat([a0, b0]) - 0.1 * d, rtol=1e-6)


def test_parameter_without_any_gradient_is_not_updated():
    a = torch.nn.Parameter(torch.randn(4))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    opt = EUPMU([a, frozen], lr=0.1, rule="adamw", mode="explicit", backend="torch")
    before = frozen.detach().clone()
    opt.zero_grad()
    (a.sum() ** 2).backward()
    opt.stash_retain_grad()
    (-a.sum()).backward()
    opt.step()
    assert torch.equal(frozen, before) and "step" not in opt.state[frozen]


def test_nonfinite_gradient_skips_step_and_counts():
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="adamw", mode="explicit", backend="torch")
    explicit_step(model, opt, 0)
    params = [p.detach().clone() for p in model.parameters()]
    states = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    forget, retain = losses(model, 1)
    retain.backward()
    opt.stash_retain_grad()
    forget.backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()
    assert opt.stats()["skipped"].item() == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, states[i][k]), k
    explicit_step(model, opt, 2)  # recovers
    assert opt.stats()["skipped"].item() == 1.0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_per_group_hyperparameters_and_add_param_group():
    m1, m2 = make_model(seed=1), make_model(seed=1)
    groups = lambda m: [{"params": m[0].parameters(), "lr": 0.01}, {"params": m[2].parameters()}]  # noqa: E731
    ours = EUPMU(groups(m1), lr=0.1, rule="sgd", momentum=0.5, mode="explicit", tolerance=1e30, backend="torch")
    theirs = torch.optim.SGD(groups(m2), lr=0.1, momentum=0.5)
    for step in range(3):
        explicit_step(m1, ours, step)
        theirs.zero_grad()
        losses(m2, step)[0].backward()
        theirs.step()
    extra1, extra2 = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    ours.add_param_group({"params": [extra1], "lr": 0.5})
    theirs.add_param_group({"params": [extra2], "lr": 0.5})
    for step in range(3, 6):
        ours.zero_grad()
        forget, retain = losses(m1, step)
        retain.backward()
        ours.stash_retain_grad()
        (forget + extra1.sum()).backward()
        ours.step()
        theirs.zero_grad()
        (losses(m2, step)[0] + extra2.sum()).backward()
        theirs.step()
    for p, q in zip(list(m1.parameters()) + [extra1], list(m2.parameters()) + [extra2]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_closure_is_called_and_its_loss_returned():
    model = make_model()
    opt = EUPMU(model.parameters(), lr=0.1, rule="sgd", mode="explicit", backend="torch")

    def closure():
        opt.zero_grad()
        forget, retain = losses(model, 0)
        retain.backward()
        opt.stash_retain_grad()
        forget.backward()
        return forget

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.stats()["gramian"].shape == (3,)
