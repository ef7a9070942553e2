"""Configurations users reach through the public API either work or raise a clear error.

Covers: warm-up from lr 0, non-finite losses and the multiplier, torch.optim checkpoints in both
directions, hyperparameter validation, torch.optim conventions (repr, schedulers, untouched
parameters, named parameters), and the numerical range of the Gramian.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from fixtures import flat64

from eupmu_kernels import EUPMU, ops

# ---------------------------------------------------------------------------------- problems


def quadratic(seed: int = 0, n: int = 6):
    """One parameter vector, L_f and L_r positive quadratics (log transforms are defined)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    t_f, t_r = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    def losses():
        return ((p - t_f) ** 2).sum() + 0.5, ((p - t_r) ** 2).sum() + 0.5

    return p, losses


def implicit_iteration(opt: EUPMU, losses, exact: bool) -> None:
    opt.zero_grad()
    f, r = losses()
    opt.combine(f, r).backward()
    opt.step()
    if exact:
        with torch.no_grad():
            f1, r1 = losses()
        opt.update_dual(r1, f1)


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def mlp_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(300 + step)
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return torch.nn.functional.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------- warm-up, NaN


@pytest.mark.parametrize("exact", [False, True], ids=["lagged", "exact"])
@pytest.mark.parametrize("dual", ["paper", "reference", "famo"])
def test_warmup_from_zero_lr_keeps_w_and_then_learns(dual, exact):
    p, losses = quadratic()
    opt = EUPMU([p], lr=0.0, rule="adamw", mode="implicit", dual=dual, w_init=0.25, backend="torch")
    start = p.detach().clone()
    implicit_iteration(opt, losses, exact)
    implicit_iteration(opt, losses, exact)  # a lagged update of the lr-0 step would run here
    assert torch.equal(p.detach(), start)  # lr 0: nothing moved ...
    assert opt.w.item() == 0.25  # ... and the multiplier learned nothing from it
    for g in opt.param_groups:
        g["lr"] = 0.05  # the schedule's warm-up ends
    for _ in range(6):
        implicit_iteration(opt, losses, exact)
    assert math.isfinite(opt.w.item())
    assert opt.stats()["skipped"].item() == 0 and opt.stats()["dual_skipped"].item() == 0
    assert not torch.equal(p.detach(), start)
    if dual != "famo":
        assert opt.w.item() != 0.25  # the multiplier moves once steps do


@pytest.mark.parametrize("dual", ["paper", "reference", "famo"])
def test_nan_loss_skips_step_and_dual_update_then_training_continues(dual):
    p, losses = quadratic()
    opt = EUPMU([p], lr=0.05, rule="sgd", mode="implicit", dual=dual, w_init=0.5, backend="torch")
    for _ in range(3):
        implicit_iteration(opt, losses, exact=False)
    w_before, p_before = opt.w.clone(), p.detach().clone()

    opt.zero_grad()
    f, r = losses()
    opt.combine(f, r * float("nan")).backward()  # one NaN retain loss
    opt.step()
    assert torch.equal(p.detach(), p_before)  # the step was skipped on the device ...
    assert opt.stats()["skipped"].item() == 1.0
    implicit_iteration(opt, losses, exact=False)  # its lagged dual update sees NaN: skipped
    assert torch.isfinite(opt.w) and opt.stats()["dual_skipped"].item() >= 1.0
    assert torch.equal(opt.w, w_before)  # both dual updates that saw NaN were skipped: w kept its value
    for _ in range(5):
        implicit_iteration(opt, losses, exact=False)
    assert torch.isfinite(opt.w)
    assert not torch.equal(p.detach(), p_before)  # training went on
    assert opt.stats()["skipped"].item() == 1.0


def test_nonfinite_loss_after_the_step_keeps_w_and_its_adam_state():
    p, losses = quadratic()
    opt = EUPMU([p], lr=0.05, rule="sgd", mode="implicit", dual="reference", w_init=0.5, backend="torch")
    implicit_iteration(opt, losses, exact=True)
    state = {k: v.clone() for k, v in opt.dual.state.to_dict().items()}
    opt.zero_grad()
    opt.combine(*losses()).backward()
    opt.step()
    opt.update_dual(torch.tensor(float("inf")))
    after = opt.dual.state.to_dict()
    for key in ("w", "adam_m", "adam_v", "adam_step"):
        assert torch.equal(after[key], state[key]), key
    assert after["skipped"].item() == state["skipped"].item() + 1


def test_paper_rule_cannot_make_w_infinite():
    p, losses = quadratic()
    opt = EUPMU([p], lr=1e-30, rule="sgd", mode="implicit", dual="paper", dual_lr=1e30, backend="torch")
    opt.zero_grad()
    opt.combine(*losses()).backward()
    opt.step()
    opt.update_dual(losses()[1] * 1e30)  # delta = (r0 - r1) / 1e-30 overflows float32
    assert torch.isfinite(opt.w) and opt.stats()["dual_skipped"].item() == 1.0


def test_log_transform_error_says_what_is_wrong():
    p, losses = quadratic()
    opt = EUPMU([p], mode="implicit", dual="reference", backend="torch")
    f, r = losses()
    with pytest.raises(ValueError, match=r"log of a non-positive value.*gradient-ascent.*got the forget loss = \[-"):
        opt.combine(-f, r)


# ---------------------------------------------------------------------------------- checkpoints


def run_torch(cls, hp, model, steps):
    opt = cls(model.parameters(), **hp)
    for step in steps:
        opt.zero_grad()
        mlp_loss(model, step).backward()
        opt.step()
    return opt


def run_eupmu(opt, model, steps):
    """Explicit mode with a zero retain gradient and lambda* = 0: exactly the base rule on g_f."""
    for step in steps:
        opt.zero_grad()
        opt.stash_retain_grad()  # no retain backward: g_r = 0
        mlp_loss(model, step).backward()
        opt.step()


TORCH_RULES = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
}


@pytest.mark.parametrize("rule", list(TORCH_RULES))
def test_torch_optim_checkpoint_continues_like_torch_optim(rule):
    cls, hp = TORCH_RULES[rule]
    model = make_mlp()
    theirs = run_torch(cls, hp, model, range(4))
    saved = copy.deepcopy(theirs.state_dict())
    twin = copy.deepcopy(model)
    for step in range(4, 9):
        theirs.zero_grad()
        mlp_loss(model, step).backward()
        theirs.step()

    ours = EUPMU(twin.parameters(), rule=rule, mode="explicit", lr=1.0, backend="torch")  # lr comes from the file
    ours.load_state_dict(saved)
    run_eupmu(ours, twin, range(4, 9))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_eupmu_checkpoint_continues_in_torch_optim():
    model = make_mlp()
    ours = EUPMU(model.parameters(), rule="adamw", mode="explicit", lr=1e-2, backend="torch")
    run_eupmu(ours, model, range(3))
    twin = copy.deepcopy(model)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch.optim aliases tensors it need not cast
    run_eupmu(ours, model, range(3, 7))
    for step in range(3, 7):
        theirs.zero_grad()
        mlp_loss(twin, step).backward()
        theirs.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_mode_or_rule_is_refused():
    model = make_mlp()
    implicit = EUPMU(model.parameters(), rule="adamw", mode="implicit", backend="torch")
    explicit = EUPMU(model.parameters(), rule="adamw", mode="explicit", backend="torch")
    with pytest.raises(ValueError, match="mode='implicit'.*mode='explicit'"):
        explicit.load_state_dict(implicit.state_dict())
    adamw = run_torch(torch.optim.AdamW, dict(lr=1e-2), make_mlp(), range(1))
    sgd = EUPMU(make_mlp().parameters(), rule="sgd", momentum=0.9, mode="explicit", backend="torch")
    with pytest.raises(ValueError, match=r"\['exp_avg', 'exp_avg_sq'\].*rule='sgd'"):
        sgd.load_state_dict(adamw.state_dict())
    momentum = run_torch(torch.optim.SGD, dict(lr=0.1, momentum=0.9), make_mlp(), range(1))
    with pytest.raises(ValueError, match=r"\['momentum_buffer'\].*rule='adamw'"):
        EUPMU(make_mlp().parameters(), rule="adamw", mode="explicit").load_state_dict(momentum.state_dict())
    adam = run_torch(torch.optim.Adam, dict(lr=1e-2), make_mlp(), range(1))
    with pytest.raises(ValueError, match="decoupled_weight_decay=False contradicts rule='adamw'"):
        EUPMU(make_mlp().parameters(), rule="adamw", mode="explicit").load_state_dict(adam.state_dict())


def test_named_parameters_are_kept_in_the_state_dict():
    model = make_mlp()
    opt = EUPMU(model.named_parameters(), mode="explicit", backend="torch")
    names = [n for n, _ in model.named_parameters()]
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = EUPMU(make_mlp().named_parameters(), mode="explicit", backend="torch")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["param_names"] == names


# ---------------------------------------------------------------------------------- validation

INVALID = [
    (dict(betas=(1.5, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(rule="sgd", momentum=-0.5), "momentum"),
    (dict(rule="sgd", dampening=2.0), "dampening"),
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=torch.tensor(0.1)), "lr must be a float, got a Tensor"),
    (dict(dual_lr=-1.0), "dual_lr"),
    (dict(w_max=-1.0), "w_max"),
    (dict(w_init=2.0, w_max=1.0), "w_max"),
    (dict(w_init=-0.1), "w_init"),
    (dict(tolerance=float("inf")), "tolerance"),
    (dict(mode="explicit", tolerance=-1.0), "tolerance"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(loss_lower_bounds=(0.0, float("nan"))), r"loss_lower_bounds\[1\]"),
    (dict(bucket_numel=0), "bucket_numel"),
    (dict(state_dtype=torch.int32), "state_dtype"),
    (dict(momentum=0.9), "momentum=0.9 has no effect with rule='adamw'"),
    (dict(rule="sgd", betas=(0.5, 0.9)), "betas=.* has no effect with rule='sgd'"),
    (dict(rule="sgd", nesterov=True), "nesterov"),
    (dict(rule="lion"), "rule must be one of"),
]


@pytest.mark.parametrize("kwargs, message", INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_hyperparameters_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EUPMU([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_param_group_and_scheduler_values_are_checked():
    opt = EUPMU([torch.nn.Parameter(torch.zeros(2))], mode="implicit", backend="torch")
    with pytest.raises(ValueError, match="param group 1: invalid lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
    opt.param_groups[0]["lr"] = float("inf")  # e.g. a broken schedule
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="param group 0: invalid lr inf"):
        opt.step()


# ---------------------------------------------------------------------------------- conventions


def test_repr_shows_the_configuration_and_only_the_rules_keys():
    opt = EUPMU([torch.nn.Parameter(torch.zeros(2))], rule="adamw", mode="explicit", surgery="pcgrad",
                max_grad_norm=1.0, backend="torch")
    text = repr(opt)
    for piece in ("mode='explicit'", "rule='adamw'", "surgery='pcgrad'", "tolerance=0.0", "max_grad_norm=1.0",
                  "backend='torch'", "betas: (0.9, 0.999)", "weight_decay: 0.01"):
        assert piece in text, piece
    assert "momentum" not in text and "nesterov" not in text
    implicit = repr(EUPMU([torch.nn.Parameter(torch.zeros(2))], rule="sgd", momentum=0.9))
    assert "dual='reference'" in implicit and "momentum: 0.9" in implicit and "betas" not in implicit


def test_one_cycle_lr_cycles_sgd_momentum():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = EUPMU([p], lr=0.1, rule="sgd", momentum=0.9, mode="implicit", backend="torch")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)  # base_momentum=0.85 .. max 0.95
    assert "betas" not in opt.param_groups[0]
    p.grad = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    sched.step()
    assert opt.param_groups[0]["momentum"] < 0.95


def test_implicit_step_without_combine_warns_once():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = EUPMU([p], mode="implicit", backend="torch")
    p.grad = torch.ones(2)
    with pytest.warns(UserWarning, match=r"without combine\(\)"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only


@pytest.mark.parametrize("capture", ["views", "copy", "reference"])
@pytest.mark.parametrize("rule, hp", [("sgd", dict(momentum=0.9, weight_decay=0.1)), ("adamw", dict(weight_decay=0.5))])
def test_parameter_without_gradients_is_left_alone_like_torch_optim(rule, hp, capture):
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)  # `unused` is in neither loss
    params = list(used.parameters()) + list(unused.parameters())
    opt = EUPMU(params, lr=0.1, rule=rule, mode="explicit", retain_capture=capture, backend="torch",
                **hp)
    before = [q.detach().clone() for q in unused.parameters()]
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        used(x).square().mean().backward()
        opt.stash_retain_grad()
        (-used(x).mean()).backward()
        opt.step()
    for q, q0 in zip(unused.parameters(), before):
        assert torch.equal(q.detach(), q0)
        assert q not in opt.state
    assert all(opt.state[q]["step"].item() == 3 for q in used.parameters())


def test_parameter_with_only_a_retain_gradient_takes_part():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = EUPMU([a, b], lr=0.1, rule="sgd", mode="explicit", backend="torch")
    opt.zero_grad()
    (a.sum() + b.square().sum()).backward()  # g_r reaches both
    opt.stash_retain_grad()
    (-a.sum()).backward()  # g_f reaches a only
    b0 = b.detach().clone()
    assert opt.retain_grads()[1] is not None
    opt.step()
    lam = opt.stats()["lambda"].item()
    torch.testing.assert_close(b.detach(), b0 - 0.1 * lam * 2 * b0)


def test_grad_scaler_stats_report_the_unscaled_gramian():
    torch.manual_seed(0)
    model = make_mlp()
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = EUPMU(model.parameters(), mode="explicit", grad_scaler=scaler, backend="torch")
    plain = EUPMU(twin.parameters(), mode="explicit", backend="torch")
    for m, opt, scale in ((model, scaled, scaler.scale), (twin, plain, lambda x: x)):
        opt.zero_grad()
        scale(mlp_loss(m, 0)).backward()
        opt.stash_retain_grad()
        scale(-mlp_loss(m, 1)).backward()
        if opt is scaled:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    torch.testing.assert_close(scaled.stats()["gramian"], plain.stats()["gramian"], rtol=1e-12, atol=0)
    assert "direction_scale" not in scaled.stats()


# ---------------------------------------------------------------------------------- Gramian range


@pytest.mark.parametrize("magnitude", [1e-30, 1e-22, 1e-19, 1.0, 1e19, 1e30])
def test_surgery_is_right_for_any_finite_float32_gradient(magnitude):
    """lambda* = -<g_f,g_r>/<g_r,g_r> is scale-free: with g_f = -g_r/2 it is 1/2 at any magnitude of the
    gradients, and d = g_f + g_r/2 = 0 (float32 squares would underflow or overflow at both ends)."""
    gen = torch.Generator().manual_seed(0)
    g_r = [(torch.randn(1000, generator=gen, dtype=torch.float64) * magnitude).float(),
           (torch.randn(7, generator=gen, dtype=torch.float64) * magnitude).float()]
    g_f = [-0.5 * r for r in g_r]  # exact in float32
    res = ops.surgery_(g_f, [r.clone() for r in g_r], method="ungrad", backend="torch")
    assert res.skipped.item() == 0.0
    assert res.coefficients[1].item() == pytest.approx(0.5, rel=1e-6)
    assert float(flat64(g_f).abs().max()) <= 1e-6 * magnitude


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_torch_gramian_is_bit_identical_for_any_thread_count(threads):
    gen = torch.Generator().manual_seed(1)
    a = [torch.randn(400_000, generator=gen), torch.randn(70_001, generator=gen)]
    b = [torch.randn(400_000, generator=gen), torch.randn(70_001, generator=gen)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gramian(a, b, backend="torch")
        torch.set_num_threads(threads)
        many = ops.gramian(a, b, backend="torch")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)
