"""Checkpointing: save mid-run, reload, continue bit-identically; torch.optim compatibility."""

import copy
import io

import pytest
import torch
from fixtures import explicit_step, losses, make_model

from eupmu_kernels import EUPMU

CONFIGS = {
    "explicit_sgd_momentum": dict(mode="explicit", rule="sgd", lr=0.05, momentum=0.9, nesterov=True),
    "explicit_adamw_clip": dict(mode="explicit", rule="adamw", lr=1e-2, max_grad_norm=0.5, surgery="pcgrad"),
    "implicit_paper_lagged": dict(mode="implicit", rule="adam", lr=1e-2, dual="paper", dual_lr=0.1),
    "implicit_reference_exact": dict(mode="implicit", rule="sgd", lr=0.05, momentum=0.9, dual="reference",
                                     dual_lr=0.5, tolerance=-0.01),
    "implicit_famo": dict(mode="implicit", rule="adamw", lr=1e-2, dual="famo"),
}


def implicit_step(model, opt, step):
    opt.zero_grad()
    forget, retain = losses(model, step)
    forget = -forget  # CE on the forget set as a positive (random-label style) loss for the log presets
    opt.combine(forget, retain).backward()
    opt.step()
    if opt.dual_config.rule == "reference" or opt.dual_config.rule == "famo":
        with torch.no_grad():
            f1, r1 = losses(model, step)
        opt.update_dual(r1, -f1)


def run_step(model, opt, step):
    if opt.mode == "explicit":
        explicit_step(model, opt, step)
    else:
        implicit_step(model, opt, step)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_at_step_5_reload_and_continue_bit_identically(name):
    cfg = CONFIGS[name]
    model = make_model()
    opt = EUPMU(model.parameters(), backend="torch", **cfg)
    for step in range(10):
        run_step(model, opt, step)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = EUPMU(model.parameters(), backend="torch", **cfg)
    for step in range(5):
        run_step(model, opt, step)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = EUPMU(resumed.parameters(), backend="torch", **cfg)
    opt2.load_state_dict(saved_opt)
    for step in range(5, 10):
        run_step(resumed, opt2, step)
    for p, q in zip(resumed.parameters(), uninterrupted):
        assert torch.equal(p, q), name
    if opt.mode == "implicit":
        assert opt2.w is not None


def test_state_keys_are_torch_compatible_both_ways():
    model = make_model()
    ours = EUPMU(model.parameters(), rule="adamw", mode="explicit", tolerance=1e30, lr=1e-2, backend="torch")
    for step in range(3):
        explicit_step(model, ours, step)
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    theirs_model = copy.deepcopy(model)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2)
    theirs.load_state_dict({k: v for k, v in copy.deepcopy(sd).items() if k != "eupmu"})
    for step in range(3, 6):
        explicit_step(model, ours, step)
        theirs.zero_grad()
        losses(theirs_model, step)[0].backward()
        theirs.step()
    for p, q in zip(model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    # and a torch.optim.SGD checkpoint (no 'step' key) loads into EUPMU
    sgd_model = make_model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    losses(sgd_model, 0)[0].backward()
    sgd.step()
    ours_sgd = EUPMU(sgd_model.parameters(), rule="sgd", lr=0.1, momentum=0.9, mode="explicit", backend="torch")
    ours_sgd.load_state_dict(sgd.state_dict())
    assert ours_sgd.state[next(sgd_model.parameters())]["step"].item() == 1.0


def test_fp32_state_for_bf16_parameters_survives_reload():
    model = make_model().to(torch.bfloat16)
    opt = EUPMU(model.parameters(), rule="adamw", mode="explicit", lr=1e-2, state_dtype=torch.float32,
                backend="torch")
    explicit_step(model, opt, 0, torch.bfloat16)
    sd = roundtrip(opt.state_dict())
    opt2 = EUPMU(model.parameters(), rule="adamw", mode="explicit", lr=1e-2, state_dtype=torch.float32,
                 backend="torch")
    opt2.load_state_dict(sd)
    p = next(model.parameters())
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
