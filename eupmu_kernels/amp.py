"""GradScaler support (docs/design.md, Mixed precision).

``torch.amp.GradScaler.step(opt)`` hands an optimizer that sets ``_step_supports_amp_scaling``
two device tensors, ``opt.grad_scale`` and ``opt.found_inf``, and leaves the unscaling to it.
EUPMU folds 1/scale into the coefficients (no extra pass over memory). Two cases need more:

* ``scaler.unscale_(opt)`` before ``scaler.step(opt)``: the scaler has unscaled ``.grad`` (g_f)
  only, so the stashed retain gradient must be unscaled here;
* a non-finite retain gradient must back off the scale like a non-finite ``.grad`` does, so the
  optimizer's skip flag is merged into the scaler's per-device ``found_inf``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


def inverse(scale: Tensor) -> Tensor:
    """1/scale in float32, computed in float64 so a power-of-two scale inverts exactly."""
    return scale.double().reciprocal().float()


def scaler_inputs(opt: Any) -> tuple[Tensor | None, Tensor | None]:
    """(1/scale, found_inf) handed over by GradScaler for this step, or Nones without a scaler."""
    grad_scale = getattr(opt, "grad_scale", None)
    return (None if grad_scale is None else inverse(grad_scale)), getattr(opt, "found_inf", None)


def unscale_retain_if_grads_were_unscaled(opt: Any, retain_buffers: Iterable[Tensor]) -> None:
    """After ``scaler.unscale_(opt)`` g_f is unscaled but the stashed g_r is not: unscale it."""
    if getattr(opt, "found_inf", None) is None or getattr(opt, "grad_scale", None) is not None:
        return  # no scaler, or both gradients still scaled (the coefficients unscale them together)
    if opt.grad_scaler is None:
        raise RuntimeError("scaler.unscale_(optimizer) unscaled only .grad (the forget gradient); pass "
                           "grad_scaler=scaler to EUPMU so the stashed retain gradient is unscaled too")
    inv_scale = inverse(opt.grad_scaler._scale)
    for buffer in retain_buffers:
        buffer.mul_(inv_scale.to(buffer.device))


def report_overflow(opt: Any, skip: Tensor) -> None:
    """Merge the step's skip flag into the scaler's found_inf, so the scale backs off."""
    if opt.grad_scaler is None or getattr(opt, "found_inf", None) is None:
        return
    per_device = opt.grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    for flag in per_device.values():
        flag.copy_(torch.maximum(flag, skip.to(device=flag.device, dtype=flag.dtype)))
