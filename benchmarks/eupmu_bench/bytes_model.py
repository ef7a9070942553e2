"""Bytes each method's step moves per parameter (docs/design.md, Bytes model), from the storage sizes.

Every pass is counted as the bytes it reads plus the bytes it writes (fp32 everywhere: fused
AdamW 28, explicit surgery + AdamW with the Gramian in the step 40, or 32 when the backward
hooks formed it, update-space surgery + AdamW 60, naive surgery >= 84). Work the hooks did during
the backward passes is not part of the step: the iteration benchmark (``eupmu-bench iteration``)
charges it where it falls. The count is the physical floor of the method as implemented, so
bytes / time is the bandwidth the method achieves on its own work, and the ratio to the device's
copy bandwidth says how close to memory speed it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StorageSizes:
    """Bytes per element of the parameters, the gradients and the optimizer moments."""

    param: int
    grad: int
    state: int

    @classmethod
    def of(cls, param_dtype: torch.dtype, state_dtype: torch.dtype) -> "StorageSizes":
        p = param_dtype.itemsize
        return cls(param=p, grad=p, state=state_dtype.itemsize)


def adamw_update(s: StorageSizes) -> int:
    """One fused AdamW pass: read p, g, m, v; write p, m, v."""
    return 2 * s.param + s.grad + 4 * s.state


def fused_adamw(s: StorageSizes) -> int:
    return adamw_update(s)


def explicit_surgery(s: StorageSizes) -> int:
    """Pass 1 reads g_f and g_r (Gramian); pass 2 also reads g_r while updating."""
    return 2 * s.grad + explicit_surgery_hooks(s)


def explicit_surgery_hooks(s: StorageSizes) -> int:
    """The Gramian came from the backward hooks: one pass that also reads g_r while updating."""
    return adamw_update(s) + s.grad


def update_space_terms(s: StorageSizes, rule: str = "adamw") -> int:
    """Update-space surgery's reduction pass (docs/design.md, Update-space surgery): reads theta, g_f,
    g_r and the rule's state once (Adam: m, v; SGD with momentum: the buffer) and gives the Gramian and
    the terms K0, K1, K2, T0 together, so a Gramian from the backward hooks saves nothing here."""
    states = 2 if rule in ("adam", "adamw") else 1
    return s.param + 2 * s.grad + states * s.state


def sgd_momentum_update(s: StorageSizes) -> int:
    """One SGD-with-momentum pass reading g_r too: read p, g_f, g_r, buf; write p, buf."""
    return 2 * s.param + 2 * s.grad + 2 * s.state


def update_space_surgery(s: StorageSizes, rule: str = "adamw") -> int:
    """Explicit UNGrad in update space: the reduction pass, the update pass (reading g_r), and the
    measurement of <theta_{t+1}, g_r> for stats()["retain_change"] (reads theta and g_r)."""
    update = explicit_surgery_hooks(s) if rule in ("adam", "adamw") else sgd_momentum_update(s)
    return update_space_terms(s, rule) + update + s.param + s.grad


def implicit_step(s: StorageSizes, reduction_pass: bool) -> int:
    """One gradient; the optional reduction (non-finite guard or clip norm) reads it once more."""
    return (s.grad if reduction_pass else 0) + adamw_update(s)


def composed_torch(s: StorageSizes) -> int:
    """foreach norms of g_f and g_r, per-tensor dots (read both), lambda*g_r into a temporary,
    g_f += temporary, then a fused AdamW pass."""
    gramian = 4 * s.grad
    combine = 2 * s.grad + 3 * s.grad
    return gramian + combine + adamw_update(s)


def naive_surgery(s: StorageSizes, clip: bool) -> int:
    """cat(g_f), cat(g_r): 2+2; dot(g_f, g_r): 2; dot(g_r, g_r): 1; lambda*g_r: 2;
    g_f + that: 3; unflatten with clone: 2 (in units of the gradient size); clip_grad_norm_
    reads once for the norm and scales in place (3); then the AdamW pass."""
    surgery = 14 * s.grad
    clipping = 3 * s.grad if clip else 0
    return surgery + clipping + adamw_update(s)


def gigabytes_per_second(bytes_per_param: int, numel: int, seconds: float) -> float:
    return bytes_per_param * numel / seconds / 1e9
