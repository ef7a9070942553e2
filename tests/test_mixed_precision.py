"""GradScaler protocol, bf16 parameters with fp32 state, and gradient accumulation."""

import pytest
import torch
from fixtures import batch, explicit_step, flat64, losses, make_model

from eupmu_kernels import EUPMU

INIT_SCALE = 1024.0  # a power of two: scaling and unscaling are exact


def scaled_explicit_step(model, opt, scaler, step, unscale_first=False, poison=None):
    opt.zero_grad()
    forget, retain = losses(model, step)
    scaler.scale(retain).backward()
    opt.stash_retain_grad()
    scaler.scale(forget).backward()
    if poison == "retain":
        opt.retain_grads()[0].view(-1)[0] = float("inf")
    if poison == "forget":
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_matches_unscaled_run(unscale_first):
    plain_model, scaled_model = make_model(), make_model()
    cfg = dict(lr=1e-2, rule="adamw", mode="explicit", max_grad_norm=0.5, backend="torch")
    plain = EUPMU(plain_model.parameters(), **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    scaled = EUPMU(scaled_model.parameters(), grad_scaler=scaler, **cfg)
    for step in range(5):
        explicit_step(plain_model, plain, step)
        scaled_explicit_step(scaled_model, scaled, scaler, step, unscale_first)
        torch.testing.assert_close(scaled.stats()["lambda"], plain.stats()["lambda"], rtol=1e-6, atol=0)
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_prior_unscale_without_scaler_reference_is_an_error():
    model = make_model()
    opt = EUPMU(model.parameters(), lr=1e-2, mode="explicit", backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaled_explicit_step(model, opt, scaler, 0, unscale_first=True)


@pytest.mark.parametrize("poison", ["forget", "retain"])
def test_overflow_skips_step_and_backs_off_scale(poison):
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    opt = EUPMU(model.parameters(), lr=1e-2, mode="explicit", grad_scaler=scaler, backend="torch")
    before = [p.detach().clone() for p in model.parameters()]
    scaled_explicit_step(model, opt, scaler, 0, poison=poison)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.stats()["skipped"].item() == 1.0
    assert scaler.get_scale() == INIT_SCALE / 2
    assert all(opt.state[p]["step"].item() == 0.0 for p in model.parameters())
    scaled_explicit_step(model, opt, scaler, 1)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_implicit_mode_with_grad_scaler():
    plain_model, scaled_model = make_model(), make_model()
    cfg = dict(lr=1e-2, rule="adam", mode="implicit", dual="paper", w_init=0.3, dual_lr=0.0, backend="torch")
    plain, scaled = EUPMU(plain_model.parameters(), **cfg), EUPMU(scaled_model.parameters(), **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for step in range(4):
        plain.zero_grad()
        plain.combine(*losses(plain_model, step)).backward()
        plain.step()
        scaled.zero_grad()
        scaler.scale(scaled.combine(*losses(scaled_model, step))).backward()
        scaler.step(scaled)
        scaler.update()
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_with_fp32_state_track_fp32_run():
    ref_model, bf_model = make_model(), make_model().to(torch.bfloat16)
    cfg = dict(lr=1e-2, rule="adamw", mode="explicit", backend="torch")
    ref_opt = EUPMU(ref_model.parameters(), **cfg)
    bf_opt = EUPMU(bf_model.parameters(), state_dtype=torch.float32, **cfg)
    for step in range(5):
        explicit_step(ref_model, ref_opt, step)
        explicit_step(bf_model, bf_opt, step, torch.bfloat16)
    p = next(bf_model.parameters())
    assert p.dtype == torch.bfloat16 and bf_opt.state[p]["exp_avg"].dtype == torch.float32
    expected = flat64(ref_model.parameters())
    err = (flat64(bf_model.parameters()) - expected).norm() / expected.norm()
    assert err < 2e-2


def test_explicit_accumulation_over_micro_batches_equals_one_large_batch():
    big_model, mb_model = make_model(), make_model()
    cfg = dict(lr=1e-2, rule="adamw", mode="explicit", backend="torch")
    big, mb = EUPMU(big_model.parameters(), **cfg), EUPMU(mb_model.parameters(), **cfg)
    ce = torch.nn.functional.cross_entropy
    for step in range(3):
        explicit_step(big_model, big, step)  # 8 forget / 16 retain examples at once
        x_f, y_f, x_r, y_r = batch(step)
        mb.zero_grad()
        for k in range(4):  # 4 micro-batches, interleaved retain and forget
            with mb.retain_grad():
                (ce(mb_model(x_r[4 * k:4 * k + 4]), y_r[4 * k:4 * k + 4]) / 4).backward()
            (-ce(mb_model(x_f[2 * k:2 * k + 2]), y_f[2 * k:2 * k + 2]) / 4).backward()
        mb.step()
    for p, q in zip(big_model.parameters(), mb_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_implicit_accumulation_averages_loss_scalars():
    big_model, mb_model = make_model(), make_model()
    cfg = dict(lr=0.05, rule="sgd", mode="implicit", dual="paper", dual_lr=0.05, backend="torch")
    big, mb = EUPMU(big_model.parameters(), **cfg), EUPMU(mb_model.parameters(), **cfg)
    ce = torch.nn.functional.cross_entropy
    for step in range(4):
        x_f, y_f, x_r, y_r = batch(step)
        big.zero_grad()
        big.combine(-ce(big_model(x_f), y_f), ce(big_model(x_r), y_r)).backward()
        big.step()
        with torch.no_grad():
            big.update_dual(ce(big_model(x_r), y_r))
        mb.zero_grad()
        for k in range(4):
            f = -ce(mb_model(x_f[2 * k:2 * k + 2]), y_f[2 * k:2 * k + 2])
            r = ce(mb_model(x_r[4 * k:4 * k + 4]), y_r[4 * k:4 * k + 4])
            (mb.combine(f, r) / 4).backward()
        mb.step()
        with torch.no_grad():
            mb.update_dual(ce(mb_model(x_r), y_r))
        torch.testing.assert_close(mb.w, big.w, rtol=1e-5, atol=1e-7)
    assert big.w.item() > 0
    for p, q in zip(big_model.parameters(), mb_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
