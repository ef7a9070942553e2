"""The Gramian formed in the backward pass equals the one the step computes, and the step falls
back on its own pass whenever the hooks could not see the gradients it uses."""

from __future__ import annotations

import copy

import pytest
import torch

from eupmu_kernels import EUPMU, available_backends


def make_model(dtype=torch.float32, widths=(300,)) -> torch.nn.Module:
    torch.manual_seed(0)
    layers, width = [], 6
    for w in widths:
        layers += [torch.nn.Linear(width, w), torch.nn.Tanh()]
        width = w
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 3)).to(dtype)


# For the bit-for-bit checks: ten tensors, one of them several 16k-element chunks long, so that a
# Gramian summed in another order than the hooks' (per-tensor totals, then a fixed-order column
# sum) differs in the last bits.
DEEP = (3000, 40, 30, 20)


def batch(step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(50 + step)
    return (torch.randn(16, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen),
            torch.randn(32, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (32,), generator=gen))


def losses(model, step, dtype=torch.float32):
    x_f, y_f, x_r, y_r = batch(step, dtype)
    ce = torch.nn.functional.cross_entropy
    return -ce(model(x_f).float(), y_f), ce(model(x_r).float(), y_r)


def twins(dtype=torch.float32, backend="torch", widths=(300,), **kwargs):
    """The same model and optimizer twice: Gramian from the hooks, and from the step."""
    model = make_model(dtype, widths)
    twin = copy.deepcopy(model)
    hooks = EUPMU(model.parameters(), backend=backend, **kwargs)
    step = EUPMU(twin.parameters(), backend=backend, gramian_in_backward=False, **kwargs)
    return (model, hooks), (twin, step)


# Backends whose in-step Gramian sums per-tensor float64 totals in the hooks' order. The native
# backend takes float32 and narrower storage only.
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    "native" not in available_backends(), reason="eupmu_kernels._C is not built"))]


def explicit_iteration(model, opt, step, dtype=torch.float32, edit=None):
    opt.zero_grad()
    forget, retain = losses(model, step, dtype)
    retain.backward()
    opt.stash_retain_grad()
    forget.backward()
    if edit is not None:
        edit(model, opt)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_explicit_hooks_give_the_step_gramian_bit_for_bit(rule, dtype, backend):
    if backend == "native" and dtype == torch.float64:
        pytest.skip("the native backend stores float32, bfloat16 and float16")
    (model, hooks), (twin, step) = twins(dtype, backend, DEEP, mode="explicit", rule=rule, lr=1e-2)
    for i in range(3):
        explicit_iteration(model, hooks, i, dtype)
        explicit_iteration(twin, step, i, dtype)
        assert hooks.gramian_source == "backward" and step.gramian_source == "step"
        assert torch.equal(hooks.stats()["gramian"], step.stats()["gramian"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_implicit_hooks_give_the_step_gramian_bit_for_bit(backend):
    (model, hooks), (twin, step) = twins(backend=backend, widths=DEEP, mode="implicit", rule="sgd", momentum=0.9,
                                         lr=0.05, max_grad_norm=0.5)
    for i in range(3):
        for m, opt in ((model, hooks), (twin, step)):
            opt.zero_grad()
            opt.combine(*[-x if k == 0 else x for k, x in enumerate(losses(m, i))]).backward()
            opt.step()
        assert hooks.gramian_source == "backward"
        assert torch.equal(hooks.stats()["gramian"], step.stats()["gramian"])


def scale_first_grad(model, opt):
    next(model.parameters()).grad.mul_(0.5)


def replace_first_grad(model, opt):
    p = next(model.parameters())
    p.grad = p.grad * 0.5


def drop_first_grad(model, opt):
    next(model.parameters()).grad = None


def second_forget_micro_batch(model, opt):
    losses(model, 99)[0].backward()


def edit_retain_gradient(model, opt):
    opt.retain_grads()[0].mul_(2.0)


@pytest.mark.parametrize("edit", [scale_first_grad, replace_first_grad, drop_first_grad, second_forget_micro_batch,
                                  edit_retain_gradient])
def test_gradients_changed_after_the_hooks_make_the_step_compute_it(edit):
    (model, hooks), (twin, step) = twins(mode="explicit", rule="adamw", lr=1e-2)
    explicit_iteration(model, hooks, 0, edit=edit)
    explicit_iteration(twin, step, 0, edit=edit)
    assert hooks.gramian_source == "step"
    assert torch.equal(hooks.stats()["gramian"], step.stats()["gramian"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_two_retain_micro_batches_fall_back():
    (model, hooks), (twin, step) = twins(mode="explicit", rule="sgd", lr=0.1)
    for m, opt in ((model, hooks), (twin, step)):
        opt.zero_grad()
        for mb in range(2):
            losses(m, mb)[1].backward()
            opt.stash_retain_grad()
        losses(m, 0)[0].backward()
        opt.step()
    assert hooks.gramian_source == "step"
    assert torch.equal(hooks.stats()["gramian"], step.stats()["gramian"])


def test_interleaved_micro_batches_fall_back_and_agree():
    (model, hooks), (twin, step) = twins(mode="explicit", rule="sgd", lr=0.1)
    for m, opt in ((model, hooks), (twin, step)):
        opt.zero_grad()
        for mb in range(2):
            forget, retain = losses(m, mb)
            with opt.retain_grad():
                retain.backward()
            forget.backward()
        opt.step()
    assert torch.equal(hooks.stats()["gramian"], step.stats()["gramian"])


def test_grad_scaler_with_prior_unscale_falls_back():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = EUPMU(model.parameters(), mode="explicit", lr=1e-2, grad_scaler=scaler, backend="torch")
    twin = copy.deepcopy(model)
    plain = EUPMU(twin.parameters(), mode="explicit", lr=1e-2, gramian_in_backward=False, backend="torch")
    opt.zero_grad()
    forget, retain = losses(model, 0)
    scaler.scale(retain).backward()
    opt.stash_retain_grad()
    scaler.scale(forget).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    explicit_iteration(twin, plain, 0)
    assert opt.gramian_source == "step"
    torch.testing.assert_close(opt.stats()["gramian"], plain.stats()["gramian"], rtol=1e-12, atol=0)


def test_grad_scaler_without_prior_unscale_uses_the_hooks():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = EUPMU(model.parameters(), mode="explicit", lr=1e-2, grad_scaler=scaler, backend="torch")
    twin = copy.deepcopy(model)
    plain = EUPMU(twin.parameters(), mode="explicit", lr=1e-2, gramian_in_backward=False, backend="torch")
    opt.zero_grad()
    forget, retain = losses(model, 0)
    scaler.scale(retain).backward()
    opt.stash_retain_grad()
    scaler.scale(forget).backward()
    scaler.step(opt)
    explicit_iteration(twin, plain, 0)
    assert opt.gramian_source == "backward"
    torch.testing.assert_close(opt.stats()["gramian"], plain.stats()["gramian"], rtol=1e-12, atol=0)


def test_parameters_reached_by_one_loss_only():
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    start = [p.detach().clone() for p in (a, b, c)]
    results = []
    for in_backward in ("auto", False):
        with torch.no_grad():
            for p, p0 in zip((a, b, c), start):
                p.copy_(p0)
        opt = EUPMU([a, b, c], mode="explicit", lr=0.1, rule="sgd", gramian_in_backward=in_backward,
                    backend="torch")
        opt.zero_grad()
        (a.square().sum() + b.sum()).backward()  # retain: a, b
        opt.stash_retain_grad()
        (-(a * c).sum()).backward()  # forget: a, c
        opt.step()
        results.append((opt.gramian_source, opt.stats()["gramian"].clone()))
    assert results[0][0] == "backward"
    assert torch.equal(results[0][1], results[1][1])
