"""Surgery rules (docs/design.md, Explicit surgery): one unit per rule, one registry.

Every rule maps the Gramian (<g_f,g_f>, <g_f,g_r>, <g_r,g_r>) to two numbers (a, b) with
d = a*g_f + b*g_r; clipping, unscaling and the non-finite guard are common to all rules and live
in the coefficient stage. A unit holds the rule's formula twice, in the two languages the
coefficient stage runs in: torch (the torch and compiled backends' fallback) and a Triton
function body; the C++/CUDA form is a case of ``pair_coefficients`` in ``csrc/eupmu_math.h``,
and the float64 oracle is ``eupmu_kernels.reference.pair_coefficients``.

The registry order gives each rule its integer code in the kernels
(:func:`eupmu_kernels.contract.surgery_codes`): append new rules at the end.
"""

from __future__ import annotations

from . import graddiff, none, pcgrad, ungrad
from .base import SurgeryRule

SURGERY_RULES: dict[str, SurgeryRule] = {unit.RULE.name: unit.RULE for unit in (ungrad, pcgrad, graddiff, none)}
# the rules a user picks for explicit mode ("none" is the one-gradient case of implicit mode)
EXPLICIT_SURGERIES = tuple(name for name in SURGERY_RULES if name != "none")


def get_surgery(name: str) -> SurgeryRule:
    rule = SURGERY_RULES.get(name)
    if rule is None:
        raise ValueError(f"method must be one of {tuple(SURGERY_RULES)}, got {name!r}")
    return rule


__all__ = ["EXPLICIT_SURGERIES", "SURGERY_RULES", "SurgeryRule", "get_surgery"]
