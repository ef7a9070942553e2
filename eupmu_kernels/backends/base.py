"""Old home of the kernel contract, kept while imports move to :mod:`eupmu_kernels.contract`."""

from __future__ import annotations

from ..contract import (  # noqa: F401
    A, CA, CB, CLIP, COEF_LEN, COS, DNORM, LAM, SKIP, KernelBackend, RuleStateLists, StepHyper, SurgeryConfig,
    rule_codes, surgery_codes,
)
from ..rules import RULES as _RULES
from ..surgery import SURGERY_RULES as _SURGERY_RULES

SURGERY_METHODS = tuple(_SURGERY_RULES)
RULES = tuple(_RULES)
METHOD_CODE = surgery_codes()
RULE_CODE = rule_codes()
