"""``eupmu_kernels.EUPMU`` steps, prepared so that only ``opt.step()`` is timed.

Before each timed step (untimed) a real backward pass writes the workload's gradients, so the
optimizer's hooks run as in training: by default they form the Gramian (explicit) or ||g||^2
(implicit) during the backward pass, and the step reads each gradient once.

Explicit mode: retain backward pass, ``stash_retain_grad()`` (keeps autograd's g_r tensors; no
data moves), forget backward pass, then the timed ``step()``. Implicit mode: one backward pass of
the combined gradient, then the timed ``step()``; the dual update runs on loss scalars after the
step and is not part of it.
"""

from __future__ import annotations

import torch

from eupmu_kernels import EUPMU

from .baselines import PreparedStep, Settings
from .workloads import Workload


def _optimizer(backend: str | None, settings: Settings, params: list[torch.Tensor], **options) -> EUPMU:
    return EUPMU(params, lr=settings.lr, rule="adamw", weight_decay=settings.weight_decay,
                 backend=backend, state_dtype=settings.state_dtype, **options)


def _state_dtype(wl: Workload, settings: Settings) -> torch.dtype:
    return settings.state_dtype or wl.dtype


def backward_into(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """A real backward pass whose gradients are ``grads``: autograd writes fresh .grad tensors and
    the optimizer's post-accumulate-grad hooks run, exactly as in training (not timed here)."""
    with torch.enable_grad():
        sum((p * g).sum() for p, g in zip(params, grads)).backward()


def prepare_explicit(wl: Workload, backend: str | None, settings: Settings, *, clip: bool,
                     in_backward: bool = True, surgery_space: str = "gradient") -> PreparedStep:
    """The step after a retain and a forget backward pass. ``in_backward``: the Gramian was formed by
    the hooks during those passes (the default), else the step computes it (8 B/param more).
    ``surgery_space="update"``: the constraint on the applied AdamW update (one more reduction pass
    and the retain-change measurement; docs/design.md, Update-space surgery)."""
    params = wl.fresh_params()
    opt = _optimizer(backend, settings, params, mode="explicit", max_grad_norm=settings.max_norm if clip else None,
                     gramian_in_backward="auto" if in_backward else False, surgery_space=surgery_space)

    def before() -> None:
        opt.zero_grad()
        backward_into(params, wl.grads_r)
        opt.stash_retain_grad()  # keeps autograd's g_r tensors: no data moves
        backward_into(params, wl.grads_f)

    before()
    return PreparedStep(opt.step, params, _state_dtype(wl, settings), before=before, keep_alive=[opt],
                        harness_bytes=wl.tensor_bytes)


def prepare_implicit(wl: Workload, backend: str | None, settings: Settings, *, guard: bool) -> PreparedStep:
    """The step after one backward pass of the combined loss (the hooks form ||g||^2 for the guard)."""
    params = wl.fresh_params()
    opt = _optimizer(backend, settings, params, mode="implicit", skip_nonfinite=guard)
    combined = [g for g in wl.grads_f]
    # the losses the combined gradient came from, so that the step also does the dual update's work
    device = params[0].device
    forget_loss, retain_loss = torch.tensor(2.0, device=device), torch.tensor(1.5, device=device)

    def before() -> None:
        opt.zero_grad()
        opt.combine(forget_loss, retain_loss)
        backward_into(params, combined)

    before()
    return PreparedStep(opt.step, params, _state_dtype(wl, settings), before=before, keep_alive=[opt],
                        harness_bytes=wl.tensor_bytes)
