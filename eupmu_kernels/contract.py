"""The kernel contract every backend implements (docs/design.md, Kernel contract).

A backend works on one *group*: lists of tensors that share a device and a storage dtype. All
scalars that depend on gradients live on the device; nothing here reads them back.

1. ``gramian(a, b)``: float64[3] (<a,a>, <a,b>, <b,b>), deterministic (fixed summation order,
   no float atomics), with float64 products so that any finite float32 input has a finite Gramian.
2. ``coefficients(gram, cfg, inv_scale, found_inf)``: the float32 *coefficient vector* below,
   computed on the device from the global Gramian by the surgery rule ``cfg.method``.
3. ``step_(rule, params, grads_f, grads_r, state, coef, hp)``: one pass per group that reads the
   coefficient vector by pointer: d = ca*g_f + cb*g_r, then the base rule, in place; nothing is
   written when ``skip`` is set. ``combine_`` writes d into g_f instead (the functional op).

The coefficient vector (``COEF_SLOTS``, float32, on the device):

=========  ===========================================================================
slot       meaning
=========  ===========================================================================
ca         coefficient of g_f in the final direction (clip and unscale folded in)
cb         coefficient of g_r in the final direction (clip and unscale folded in)
skip       1.0 when the step must be skipped (non-finite Gramian or found_inf), else 0.0
lam        the rule's coefficient on g_r before clipping (lambda* for ungrad)
clip       clip factor min(1, max_norm / (||d|| + 1e-6)), 1.0 without clipping
cos        cos(g_f, g_r), 0.0 when either is zero
dnorm      ||d|| before clipping (unscaled)
a          the rule's coefficient on g_f before clipping (1.0 except for pcgrad)
=========  ===========================================================================

When ``skip`` is set, ``ca = 1`` and ``cb = 0`` so that an in-place combine leaves g_f as it
was; the update kernels then leave parameters, optimizer state and step counts untouched.

The slot indices and the integer codes of surgery and base rules are generated here, from the
registries, for Python, the Triton kernels and the C++/CUDA kernels (:func:`c_header`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import Tensor

COEF_SLOTS = ("ca", "cb", "skip", "lam", "clip", "cos", "dnorm", "a")
COEF_LEN = len(COEF_SLOTS)
CA, CB, SKIP, LAM, CLIP, COS, DNORM, A = range(COEF_LEN)
CLIP_EPS = 1e-6  # added to ||d|| in the clip factor

# Update-space surgery (docs/design.md, Update-space surgery): the one reduction pass over g_f, g_r,
# theta and the state gives the Gramian and the terms of the retain change, float64 each:
# -<u, g_r> = K0 + c*(K1 + lambda*K2) for the step u with d = c*(g_f + lambda*g_r), T0 = <theta, g_r>.
TERM_SLOTS = ("aa", "ab", "bb", "k0", "k1", "k2", "t0")
TERMS_LEN = len(TERM_SLOTS)
TERM_AA, TERM_AB, TERM_BB, TERM_K0, TERM_K1, TERM_K2, TERM_T0 = range(TERMS_LEN)
CLIP_ITERATIONS = 8  # fixed-point steps of the update-space solve under clipping


@dataclass(frozen=True)
class SurgeryConfig:
    """How the coefficients are derived from the Gramian.

    ``method="none"`` is the one-gradient case (implicit mode): d = g_f, with only the clip
    factor, the unscale and the non-finite guard applied.
    """

    method: str = "ungrad"
    tolerance: float = 0.0
    alpha: float = 1.0
    max_norm: float | None = None

    @property
    def eps(self) -> float:  # the field's former name, still read by some kernels' wrappers
        return self.tolerance


@dataclass(frozen=True)
class StepHyper:
    """Hyperparameters of one update launch (host floats: changing them never recompiles)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon (the surgery tolerance is SurgeryConfig.tolerance)
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    # update-space surgery: Adam's denominator from the uncorrected g_f (docs/design.md, Update-space surgery)
    uncorrected_preconditioner: bool = False


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

    def supports_update_space(self, device: torch.device) -> bool:
        """True when ``update_terms``, ``update_space_coefficients`` and the uncorrected-preconditioner
        step run on tensors of this device (docs/design.md, Update-space surgery)."""

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        """float64[3] (<a,a>, <a,b>, <b,b>) over all pairs; (<a,a>, 0, 0) when b is None.

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

    def update_terms(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
                     grads_r: Sequence[Tensor], state: RuleStateLists, hp: StepHyper) -> Tensor:
        """float64[TERMS_LEN] (<g_f,g_f>, <g_f,g_r>, <g_r,g_r>, K0, K1, K2, T0) of update-space
        surgery for this group, in one pass: the step with d = c*(g_f + lambda*g_r) moves theta by
        u with -<u, g_r> = K0 + c*(K1 + lambda*K2), and T0 = <theta, g_r> before the step
        (docs/design.md, Update-space surgery). ``hp`` is that of the update-space step
        (``uncorrected_preconditioner``: Adam's denominator from the uncorrected g_f)."""

    def update_space_coefficients(self, terms: Tensor, cfg: SurgeryConfig, budget: float,
                                  found_inf: Tensor | None) -> Tensor:
        """float32[COEF_LEN] from the global float64[TERMS_LEN] (Gramian and terms), on the device:
        the smallest lambda >= 0 with K0 + c*(K1 + lambda*K2) >= -budget (rounded up to float32)."""


# ---------------------------------------------------------------------------------- codes


def surgery_codes() -> dict[str, int]:
    """Integer code of each surgery rule, shared with the kernels (registry order)."""
    from .surgery import SURGERY_RULES

    return {name: i for i, name in enumerate(SURGERY_RULES)}


def rule_codes() -> dict[str, int]:
    """Integer code of each base update rule, shared with the kernels (registry order)."""
    from .rules import RULES

    return {name: i for i, name in enumerate(RULES)}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def c_header() -> str:
    """``eupmu_contract.h``: slots and codes for the C++/CUDA kernels, generated from this module.

    The build writes it into a build folder on the include path (``csrc/build_ext_config.py``,
    ``benchmarks/gpu_readiness.py``); no copy lives in the source tree, so none can go stale."""
    methods = surgery_codes()
    rules = rule_codes()
    lines = ["// Generated by eupmu_kernels.contract.c_header() at build time: the coefficient slots and",
             "// the codes of the surgery and base rules, from the Python registries. Do not edit.",
             "#pragma once", "", "namespace eupmu {", "",
             f"constexpr int kCoefLen = {COEF_LEN};"]
    lines += [f"constexpr int k{_camel(slot)} = {i};" for i, slot in enumerate(COEF_SLOTS)]
    # float64: the coefficient stage computes in float64 (docs/design.md, Kernel contract)
    lines += [f"constexpr double kClipEps = {CLIP_EPS!r};", ""]
    lines += [f"constexpr int kTermsLen = {TERMS_LEN};"]
    lines += [f"constexpr int kTerm{_camel(slot)} = {i};" for i, slot in enumerate(TERM_SLOTS)]
    lines += [f"constexpr int kClipIterations = {CLIP_ITERATIONS};", ""]
    method_list = ", ".join(f"kMethod{_camel(n)} = {c}" for n, c in methods.items())
    rule_list = ", ".join(f"kRule{_camel(n)} = {c}" for n, c in rules.items())
    lines += [f"enum Method : int {{ {method_list} }};", f"constexpr int kMethodCount = {len(methods)};",
              f"enum Rule : int {{ {rule_list} }};", f"constexpr int kRuleCount = {len(rules)};", ""]
    # the names in code order, so that the bindings report the codes without a list of their own
    method_names = ", ".join(f'"{n}"' for n in sorted(methods, key=methods.get))
    rule_names = ", ".join(f'"{n}"' for n in sorted(rules, key=rules.get))
    lines += [f"constexpr const char* kMethodNames[kMethodCount] = {{{method_names}}};",
              f"constexpr const char* kRuleNames[kRuleCount] = {{{rule_names}}};", "",
              "}  // namespace eupmu", ""]
    return "\n".join(lines)

