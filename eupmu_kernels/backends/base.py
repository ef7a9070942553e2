"""The kernel contract every backend implements (SPEC section 6).

A backend works on one *group*: lists of tensors that share a device and a storage dtype.
All scalars that depend on gradients live on the device; nothing here reads them back.

Coefficient vector (float32, length ``COEF_LEN``, on the device), read by pointer by the
update kernels:

====  =========  ===========================================================================
idx   name       meaning
====  =========  ===========================================================================
0     ca         coefficient of g_f in the final direction (clip and unscale folded in)
1     cb         coefficient of g_r in the final direction (clip and unscale folded in)
2     skip       1.0 when the step must be skipped (non-finite Gramian or found_inf), else 0.0
3     lam        the rule's coefficient on g_r before clipping (lambda* for ungrad)
4     clip       clip factor min(1, max_norm / (||d|| + 1e-6)), 1.0 without clipping
5     cos        cos(g_f, g_r), 0.0 when either is zero
6     dnorm      ||d|| before clipping (unscaled)
7     a          the rule's coefficient on g_f before clipping (1.0 except for pcgrad)
====  =========  ===========================================================================

When ``skip`` is set, ``ca = 1`` and ``cb = 0`` so that an in-place combine leaves g_f as it
was; the update kernels then leave parameters, optimizer state and step counts untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import Tensor

COEF_LEN = 8
CA, CB, SKIP, LAM, CLIP, COS, DNORM, A = range(COEF_LEN)

SURGERY_METHODS = ("ungrad", "pcgrad", "graddiff", "none")
RULES = ("sgd", "adam", "adamw")

# Integer codes shared with the compiled and Triton kernels.
METHOD_CODE = {"ungrad": 0, "pcgrad": 1, "graddiff": 2, "none": 3}
RULE_CODE = {"sgd": 0, "adam": 1, "adamw": 2}


@dataclass(frozen=True)
class SurgeryConfig:
    """How the coefficients are derived from the Gramian.

    ``method="none"`` is the one-gradient case (implicit mode): d = g_f, with only the clip
    factor, the unscale and the non-finite guard applied.
    """

    method: str = "ungrad"
    eps: float = 0.0
    alpha: float = 1.0
    max_norm: float | None = None


@dataclass(frozen=True)
class StepHyper:
    """Hyperparameters of one update-rule launch (host floats: changing them never recompiles)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class RuleStateLists:
    """Per-parameter optimizer state, aligned with the parameter list of a group.

    ``step`` holds 0-dim float32 tensors on the parameters' device. ``exp_avg`` and
    ``exp_avg_sq`` are used by adam/adamw, ``momentum_buffer`` by sgd with momentum > 0.
    State tensors may be float32 while parameters are bf16/fp16 (mixed precision).
    """

    step: list[Tensor] = field(default_factory=list)
    exp_avg: list[Tensor] = field(default_factory=list)
    exp_avg_sq: list[Tensor] = field(default_factory=list)
    momentum_buffer: list[Tensor] = field(default_factory=list)


class KernelBackend(Protocol):
    name: str

    def available(self) -> bool:
        """True when this backend can run at all in this process."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True when this backend can run on tensors of this device and storage dtype."""

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        """float32[3] (<a,a>, <a,b>, <b,b>) over all pairs; (<a,a>, 0, 0) when b is None.

        Deterministic: the same inputs give bit-identical results. Non-finite inputs give a
        non-finite result (that is how the non-finite guard sees them)."""

    def coefficients(self, gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None,
                     found_inf: Tensor | None) -> Tensor:
        """float32[COEF_LEN] from a (global, scaled) Gramian; see the module docstring."""

    def combine_(self, grads_f: Sequence[Tensor], grads_r: Sequence[Tensor] | None, coef: Tensor) -> None:
        """g_f <- ca*g_f + cb*g_r in place (g_r term absent when grads_r is None)."""

    def step_(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
              grads_r: Sequence[Tensor] | None, state: RuleStateLists, coef: Tensor, hp: StepHyper) -> None:
        """Fused combine + base update in place: unless coef[SKIP] is set, d = ca*g_f + cb*g_r,
        then the rule's update of params and state, step += 1. g_f and g_r are only read."""
