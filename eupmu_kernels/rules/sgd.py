"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD semantics)."""

from __future__ import annotations

from typing import Any

from ..contract import StepHyper
from .base import BaseRule, check_number


class SGDRule(BaseRule):
    def check_group(self, group: dict[str, Any], where: str) -> None:
        super().check_group(group, where)
        check_number(group["momentum"], "momentum", where)
        check_number(group["dampening"], "dampening", where, high=1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0")

    def active_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self.state_keys if group["momentum"] != 0 else ()

    def step_hyper(self, group: dict[str, Any]) -> StepHyper:
        return StepHyper(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                         momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                         nesterov=bool(group["nesterov"]))


SGD = SGDRule(name="sgd", defaults=(("momentum", 0.0), ("dampening", 0.0), ("weight_decay", 0.0),
                                    ("nesterov", False)), state_keys=("momentum_buffer",),
            checkpoint_keys=(("maximize", False),))
