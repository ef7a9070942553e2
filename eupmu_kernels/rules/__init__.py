"""Base update rules (docs/design.md, Base update rules): one unit per rule, one registry.

A rule unit says what the optimizer needs to know about the rule, so nothing outside the unit
branches on a rule's name: its per-group hyperparameters and their ``torch.optim`` defaults,
their validation, its per-parameter state, and the :class:`StepHyper` its kernels take. The
element-wise update itself lives in the kernels (``csrc/eupmu_math.h`` for the compiled kernels,
the Triton and torch backends) and in the float64 reference.
"""

from __future__ import annotations

from .adam import ADAM, ADAMW
from .base import BaseRule
from .sgd import SGD

RULES: dict[str, BaseRule] = {rule.name: rule for rule in (SGD, ADAM, ADAMW)}


def get_rule(name: str) -> BaseRule:
    rule = RULES.get(name)
    if rule is None:
        raise ValueError(f"rule must be one of {tuple(RULES)}, got {name!r}")
    return rule


__all__ = ["RULES", "BaseRule", "get_rule"]
