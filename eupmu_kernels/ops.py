"""Functional ops on lists of tensors, dispatched to a kernel backend.

Inputs may mix devices and dtypes: they are split into (device, dtype) groups, each group runs
on its backend, and the Gramian is summed over groups in a fixed order. Nothing is read back to
the host: every result is a device tensor.

- :func:`gramian`: float64[3] (<a,a>, <a,b>, <b,b>);
- :func:`coefficient_vector`: the float32 coefficient vector of ``eupmu_kernels.contract`` from a
  Gramian (the surgery rule, clipping, unscaling and the non-finite guard);
- :func:`combine_`: g_f <- ca*g_f + cb*g_r in place, reading the coefficient vector by pointer;
- :func:`surgery_`: all three, so that ``grads_f`` holds the surgery direction d.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import dispatch
from .contract import CLIP, LAM, SKIP, A, KernelBackend, SurgeryConfig
from .surgery import SURGERY_RULES
from .validation import check_pairs

GroupKey = tuple[torch.device, torch.dtype]


class SurgeryResult(NamedTuple):
    """Device tensors describing one surgery: nothing here has been read by the host."""

    gramian: Tensor  # float64[3]: <g_f,g_f>, <g_f,g_r>, <g_r,g_r>
    coefficients: Tensor  # float32[2]: (a, b) with d = clip * (a*g_f + b*g_r)
    clip: Tensor  # float32 scalar
    skipped: Tensor  # float32 scalar, 1.0 when the Gramian was non-finite and g_f was left as is
    raw: Tensor  # the whole float32 coefficient vector (eupmu_kernels.contract)


def group_indices(tensors: Sequence[Tensor]) -> "OrderedDict[GroupKey, list[int]]":
    groups: OrderedDict[GroupKey, list[int]] = OrderedDict()
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def make_config(method: str, tolerance: float, alpha: float, max_norm: float | None) -> SurgeryConfig:
    if method not in SURGERY_RULES:
        raise ValueError(f"method must be one of {tuple(SURGERY_RULES)}, got {method!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite value >= 0, got {tolerance}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be positive and finite, or None, got {max_norm}")
    return SurgeryConfig(method=method, tolerance=float(tolerance), alpha=float(alpha),
                         max_norm=None if max_norm is None else float(max_norm))


def _tolerance(tolerance: float, eps: float | None) -> float:
    """``eps`` is the former name of ``tolerance`` (kept so existing calls keep working)."""
    return tolerance if eps is None else eps


def _backend_for(key: GroupKey, backend: str | None) -> KernelBackend:
    return dispatch.get_backend(dispatch.requested_backend(backend), key[0], key[1])


def sum_gramians(parts: Sequence[Tensor]) -> Tensor:
    """Sum partial Gramians in list order, in float64, on the first part's device."""
    total = parts[0].to(torch.float64)
    for part in parts[1:]:
        total = total + part.to(device=total.device, dtype=torch.float64, non_blocking=True)
    return total


def gramian(tensors_a: Sequence[Tensor], tensors_b: Sequence[Tensor] | None = None, *,
            backend: str | None = None) -> Tensor:
    """float64[3] (<a,a>, <a,b>, <b,b>) summed over all tensor pairs, on the device.

    With ``tensors_b=None`` the result is (<a,a>, 0, 0).
    """
    tensors_a = list(tensors_a)
    tensors_b = None if tensors_b is None else list(tensors_b)
    if not tensors_a:
        raise ValueError("tensors_a is empty")
    check_pairs(tensors_a, tensors_b, "tensors_a", "tensors_b")
    parts = []
    for key, idx in group_indices(tensors_a).items():
        a = [tensors_a[i] for i in idx]
        b = None if tensors_b is None else [tensors_b[i] for i in idx]
        parts.append(_backend_for(key, backend).gramian(a, b))
    return sum_gramians(parts)


def coefficient_vector(gram: Tensor, *, method: str = "ungrad", tolerance: float = 0.0, alpha: float = 1.0,
                       max_norm: float | None = None, inv_scale: Tensor | None = None,
                       found_inf: Tensor | None = None, backend: str | None = None,
                       eps: float | None = None) -> Tensor:
    """The float32 coefficient vector (slots in ``eupmu_kernels.contract``) from a Gramian."""
    cfg = make_config(method, _tolerance(tolerance, eps), alpha, max_norm)
    return _backend_for((gram.device, torch.float32), backend).coefficients(gram, cfg, inv_scale, found_inf)


coefficients = coefficient_vector  # the former name


def surgery_(grads_f: Sequence[Tensor], grads_r: Sequence[Tensor], *, method: str = "ungrad",
             tolerance: float = 0.0, alpha: float = 1.0, max_norm: float | None = None,
             backend: str | None = None, eps: float | None = None) -> SurgeryResult:
    """Overwrite ``grads_f`` with the surgery direction d (docs/design.md, Explicit surgery), in place.

    ``grads_r`` is only read. If any gradient is non-finite, ``grads_f`` is left unchanged and
    ``skipped`` is 1.
    """
    grads_f, grads_r = list(grads_f), list(grads_r)
    cfg = make_config(method, _tolerance(tolerance, eps), alpha, max_norm)
    gram = gramian(grads_f, grads_r, backend=backend)
    coef = None
    for key, idx in group_indices(grads_f).items():
        be = _backend_for(key, backend)
        if coef is None:
            coef = be.coefficients(gram, cfg, None, None)
        be.combine_([grads_f[i] for i in idx], [grads_r[i] for i in idx], coef.to(key[0], non_blocking=True))
    assert coef is not None
    return SurgeryResult(gramian=gram, coefficients=torch.stack([coef[A], coef[LAM]]),
                         clip=coef[CLIP], skipped=coef[SKIP], raw=coef)


def combine_(grads_f: Sequence[Tensor], grads_r: Sequence[Tensor] | None, coef: Tensor, *,
             backend: str | None = None) -> None:
    """g_f <- ca*g_f + cb*g_r in place, unless the coefficient vector's skip slot is set."""
    grads_f = list(grads_f)
    grads_r = None if grads_r is None else list(grads_r)
    check_pairs(grads_f, grads_r, "grads_f", "grads_r")
    for key, idx in group_indices(grads_f).items():
        _backend_for(key, backend).combine_([grads_f[i] for i in idx],
                                            None if grads_r is None else [grads_r[i] for i in idx],
                                            coef.to(key[0], non_blocking=True))


__all__ = ["SurgeryResult", "gramian", "coefficient_vector", "coefficients", "surgery_", "combine_"]
