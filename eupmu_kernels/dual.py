"""Loss weighting for the one-backward-pass modes (SPEC sections 3 and 4).

A controller turns the two loss scalars into the objective J whose gradient the optimizer
applies, and after the step moves its own device-resident variables from the observed retain
(and, for FAMO, forget) loss. Every value here stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import LOG_OFFSET

DUAL_RULES = ("paper", "reference", "famo")
TRANSFORMS = ("identity", "log")
WEIGHTINGS = ("unnormalised", "normalised")


def check_log_argument(loss: Tensor, lower_bound: float, what: str) -> None:
    """A log transform needs loss - lower_bound + 1e-8 > 0.

    On CPU the value is checked directly (no device to synchronise with); on an accelerator an
    asynchronous device assertion carries the same message, so the host never waits.
    """
    ok = (loss.detach() - lower_bound + LOG_OFFSET) > 0
    message = (f"loss_transform='log' needs {what} > lower bound {lower_bound} (log of a non-positive "
               f"value); use loss_transform='identity' for losses that can go negative, e.g. gradient ascent")
    if loss.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def apply_transform(loss: Tensor, kind: str, lower_bound: float, what: str) -> Tensor:
    if kind == "identity":
        return loss
    check_log_argument(loss, lower_bound, what)
    return torch.log(loss - lower_bound + LOG_OFFSET)


@dataclass
class DualConfig:
    rule: str = "paper"
    lr: float = 1.0
    w_init: float = 0.0
    w_max: float | None = None
    psi: str = "identity"  # transform in the objective
    phi: str = "identity"  # transform in the dual update
    scale_by_lr: bool = True  # s_t = eta_t (paper) or 1
    weighting: str = "unnormalised"
    tolerance: float = 0.0
    lower_bound_f: float = 0.0
    lower_bound_r: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.01
    famo_lr: float = 0.025
    famo_weight_decay: float = 1e-5


def preset(rule: str, **overrides) -> DualConfig:
    """Defaults per dual rule; explicit (non-None) overrides win."""
    if rule not in DUAL_RULES:
        raise ValueError(f"dual must be one of {DUAL_RULES}, got {rule!r}")
    base = {"paper": {}, "reference": {"psi": "log", "phi": "log", "scale_by_lr": False},
            "famo": {"psi": "log", "phi": "log", "scale_by_lr": False}}[rule]
    cfg = DualConfig(rule=rule, **base)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if cfg.psi not in TRANSFORMS or cfg.phi not in TRANSFORMS:
        raise ValueError(f"loss_transform must be one of {TRANSFORMS}")
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    if cfg.w_init < 0:
        raise ValueError(f"w_init must be >= 0, got {cfg.w_init}")
    return cfg


class DualState:
    """Device tensors of the multiplier (or FAMO logits) and its optimiser state."""

    KEYS = ("w", "adam_m", "adam_v", "adam_step", "logits", "famo_m", "famo_v", "famo_step")

    def __init__(self, cfg: DualConfig, device: torch.device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.w = torch.full((), cfg.w_init, **f32)
        self.adam_m = torch.zeros((), **f32)
        self.adam_v = torch.zeros((), **f32)
        self.adam_step = torch.zeros((), **f32)
        self.logits = torch.zeros(2, **f32)
        self.famo_m = torch.zeros(2, **f32)
        self.famo_v = torch.zeros(2, **f32)
        self.famo_step = torch.zeros((), **f32)

    def to_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load(self, values: dict[str, Tensor]) -> None:
        for k in self.KEYS:
            if k in values:
                current = getattr(self, k)
                setattr(self, k, values[k].detach().to(device=current.device, dtype=current.dtype).clone())


def _adam_descent(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float) -> Tensor:
    """One torch.optim.Adam step (coupled weight decay), in place on m, v, step; returns new x."""
    grad = grad + weight_decay * x
    step.add_(1.0)
    m.lerp_(grad, 1.0 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
    t = step.double()
    bc1 = (1.0 - torch.pow(betas[0], t)).float()
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(betas[1], t)).float()
    return x - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)


class LossWeighting:
    """Builds J from (L_f, L_r) and updates the dual variables from the observed losses."""

    def __init__(self, cfg: DualConfig) -> None:
        self.cfg = cfg
        self.state: DualState | None = None

    def ensure_state(self, device: torch.device) -> DualState:
        if self.state is None:
            self.state = DualState(self.cfg, device)
        return self.state

    def objective(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        cfg = self.cfg
        st = self.ensure_state(forget_loss.device)
        if cfg.rule == "famo":
            return self._famo_objective(forget_loss, retain_loss, st)
        f = apply_transform(forget_loss, cfg.psi, cfg.lower_bound_f, "the forget loss")
        r = apply_transform(retain_loss, cfg.psi, cfg.lower_bound_r, "the retain loss")
        w = st.w.to(forget_loss.dtype)
        j = f + w * r
        return j / (1.0 + w) if cfg.weighting == "normalised" else j

    def _famo_objective(self, forget_loss: Tensor, retain_loss: Tensor, st: DualState) -> Tensor:
        d = self._famo_shifted(forget_loss, retain_loss)
        check_log_argument(d.min() - LOG_OFFSET, 0.0, "each loss minus its lower bound")
        z = torch.softmax(st.logits, 0).to(d.dtype)
        c = (z / d).sum().detach()
        return (z * torch.log(d)).sum() / c

    def update(self, before: tuple[Tensor, Tensor], after: tuple[Tensor | None, Tensor], step_lr: float) -> None:
        """Move the dual variables from the losses before and after one model step."""
        cfg = self.cfg
        st = self.ensure_state(before[1].device)
        if cfg.rule == "famo":
            self._famo_update(before, after, st)
            return
        r0 = apply_transform(before[1].detach().float(), cfg.phi, cfg.lower_bound_r, "the retain loss")
        r1 = apply_transform(after[1].detach().float().to(r0.device), cfg.phi, cfg.lower_bound_r,
                             "the retain loss after the step")
        scale = step_lr if cfg.scale_by_lr else 1.0
        delta = (r0 - r1) / scale + cfg.tolerance
        if cfg.rule == "paper":
            new_w = st.w - cfg.lr * delta
        else:
            new_w = _adam_descent(st.w, delta, st.adam_m, st.adam_v, st.adam_step, cfg.lr, cfg.adam_betas,
                                  cfg.adam_eps, cfg.adam_weight_decay)
        st.w.copy_(torch.clamp(new_w, min=0.0, max=cfg.w_max))

    def _famo_shifted(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        """D_i = L_i - m_i + 1e-8 for (forget, retain), built from Python-float bounds (no copy)."""
        cfg = self.cfg
        return torch.stack([forget_loss - cfg.lower_bound_f, retain_loss - cfg.lower_bound_r]) + LOG_OFFSET

    def _famo_update(self, before, after, st: DualState) -> None:
        cfg = self.cfg
        if after[0] is None:
            raise ValueError("dual='famo' needs the forget loss after the step too: "
                             "update_dual(retain_loss_after, forget_loss_after)")
        device = st.logits.device
        d0 = self._famo_shifted(*(t.detach().float().to(device) for t in before))
        d1 = self._famo_shifted(*(t.detach().float().to(device) for t in after))
        delta = torch.log(d0) - torch.log(d1)
        z = torch.softmax(st.logits, 0)
        grad = z * (delta - (z * delta).sum())
        new_logits = _adam_descent(st.logits, grad, st.famo_m, st.famo_v, st.famo_step, cfg.famo_lr,
                                   cfg.adam_betas, cfg.adam_eps, cfg.famo_weight_decay)
        st.logits.copy_(new_logits)
