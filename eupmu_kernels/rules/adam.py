"""Adam (L2 weight decay) and AdamW (decoupled weight decay), torch.optim semantics, no amsgrad."""

from __future__ import annotations

from typing import Any

from ..contract import StepHyper
from .base import BaseRule, check_number


class AdamRule(BaseRule):
    def check_group(self, group: dict[str, Any], where: str) -> None:
        super().check_group(group, where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair of floats, got {betas!r}")
        check_number(betas[0], "betas[0]", where, high=1.0, high_open=True)
        check_number(betas[1], "betas[1]", where, high=1.0, high_open=True)
        check_number(group["eps"], "eps", where)
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"{where}: {flag}=True is not supported by EUPMU")
        decoupled = group.get("decoupled_weight_decay")  # present in torch.optim Adam/AdamW checkpoints
        if decoupled is not None and bool(decoupled) != (self.name == "adamw"):
            raise ValueError(f"{where}: decoupled_weight_decay={decoupled} contradicts rule={self.name!r} "
                             f"(use rule={'adamw' if decoupled else 'adam'!r})")

    def step_hyper(self, group: dict[str, Any]) -> StepHyper:
        beta1, beta2 = group["betas"]
        return StepHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]))


ADAM = AdamRule(name="adam", defaults=(("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0)),
                state_keys=("exp_avg", "exp_avg_sq"),
                checkpoint_keys=(("amsgrad", False), ("maximize", False), ("decoupled_weight_decay", False)))
ADAMW = AdamRule(name="adamw", defaults=(("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 1e-2)),
                 state_keys=("exp_avg", "exp_avg_sq"),
                 checkpoint_keys=(("amsgrad", False), ("maximize", False), ("decoupled_weight_decay", True)))
