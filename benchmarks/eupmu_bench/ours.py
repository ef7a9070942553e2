"""``eupmu_kernels.EUPMU`` steps, prepared so that only ``opt.step()`` is timed.

Explicit mode: the retain gradient is stashed once (``.grad = g_r``; ``stash_retain_grad()``
copies it into the optimizer's flat buffer), then ``.grad`` is set to g_f. ``step()`` reads
both and then releases the captured retain gradient; in training the next
``stash_retain_grad()`` captures it again, with no data movement (the default
``retain_capture="reference"`` keeps the tensors autograd made). The benchmark stashes g_r again
before each timed step, outside the timing, and times exactly the work of a user's ``step()``.

Implicit mode: ``.grad`` holds the gradient of the combined loss; ``step()`` is timed. The dual
update runs after the step on loss scalars and is not part of it.
"""

from __future__ import annotations

import torch

from eupmu_kernels import EUPMU

from .baselines import PreparedStep, Settings, install_grads
from .workloads import Workload


def _optimizer(backend: str | None, settings: Settings, params: list[torch.Tensor], **options) -> EUPMU:
    return EUPMU(params, lr=settings.lr, rule="adamw", weight_decay=settings.weight_decay,
                 backend=backend, state_dtype=settings.state_dtype, **options)


def _state_dtype(wl: Workload, settings: Settings) -> torch.dtype:
    return settings.state_dtype or wl.dtype


def prepare_explicit(wl: Workload, backend: str | None, settings: Settings, *, clip: bool) -> PreparedStep:
    params = wl.fresh_params()
    opt = _optimizer(backend, settings, params, mode="explicit",
                     max_grad_norm=settings.max_norm if clip else None)

    def before() -> None:
        # What a training iteration hands the step: g_r kept by reference (stash moves no data), g_f in .grad.
        install_grads(params, wl.grads_r)
        opt.stash_retain_grad()
        install_grads(params, wl.grads_f)

    before()

    return PreparedStep(opt.step, params, _state_dtype(wl, settings), before=before, keep_alive=[opt],
                        harness_bytes=wl.tensor_bytes)


def prepare_implicit(wl: Workload, backend: str | None, settings: Settings, *, guard: bool) -> PreparedStep:
    params = wl.fresh_params()
    opt = _optimizer(backend, settings, params, mode="implicit", skip_nonfinite=guard)
    install_grads(params, wl.grads_f)
    return PreparedStep(opt.step, params, _state_dtype(wl, settings), keep_alive=[opt],
                        harness_bytes=wl.tensor_bytes)
