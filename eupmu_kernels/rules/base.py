"""What every base-rule unit provides."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..contract import StepHyper


def check_number(value: Any, name: str, where: str, *, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False) -> None:
    """A real (not Tensor, not bool) in [low, high] (or [low, high)); else a ValueError naming it."""
    if isinstance(value, Tensor):
        raise ValueError(f"{where}: {name} must be a float, got a Tensor (EUPMU's kernels take hyperparameters "
                         "by value; a Tensor learning rate is not supported)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be a float, got {type(value).__name__} {value!r}")
    above = value < high if high_open else value <= high
    if not (low <= value and above and math.isfinite(value)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{where}: invalid {name} {value!r} (expected a finite value in [{low}, {high}{bracket})")


@dataclass(frozen=True)
class BaseRule:
    """One base update rule: ``name`` (also the kernels' rule), hyperparameter defaults, state."""

    name: str
    defaults: tuple[tuple[str, Any], ...]  # per-group hyperparameters besides lr, torch.optim defaults
    state_keys: tuple[str, ...]  # per-parameter state tensors (shaped like the parameter), besides 'step'
    # Group keys written into state dicts so that torch.optim reads them with the same meaning
    # (torch.optim.AdamW fills a missing decoupled_weight_decay with False: Adam's L2 decay).
    checkpoint_keys: tuple[tuple[str, Any], ...] = ()

    def default_hyperparameters(self) -> dict[str, Any]:
        return dict(self.defaults)

    def check_group(self, group: dict[str, Any], where: str) -> None:
        check_number(group["lr"], "lr", where)
        check_number(group["weight_decay"], "weight_decay", where)

    def active_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors this group's hyperparameters use."""
        return self.state_keys

    def step_hyper(self, group: dict[str, Any]) -> StepHyper:
        raise NotImplementedError
