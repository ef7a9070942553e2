"""Implicit surgery: the one-backward objective and its multiplier (docs/design.md, Implicit surgery).

:class:`DualController` owns everything the implicit mode adds to a plain optimizer: it builds
J from the two loss scalars, remembers the losses of the step (averaged over micro-batches and
data-parallel ranks), and after the model step moves its device-resident variables (the
multiplier w and its Adam moments, or FAMO's logits) from the retain loss observed after the
step. Every value stays on the device; the host never reads one.

Guards (nothing here can silently stop learning):

* a step taken with learning rate 0 (e.g. the first step of a warm-up) moved nothing, so it
  teaches the multiplier nothing: its dual update is dropped and w stays as it was;
* a dual update whose inputs or results are not finite (a NaN or infinite loss) is skipped on
  the device: w, its optimiser state and FAMO's logits keep their last finite values, and
  ``skipped`` counts the skipped updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from . import distributed as dist_util

DUAL_RULES = ("paper", "reference", "famo")
TRANSFORMS = ("identity", "log")
WEIGHTINGS = ("unnormalised", "normalised")
LOG_OFFSET = 1e-8  # c in psi(L) = log(L - m + c)


# ---------------------------------------------------------------------------------- configuration


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

    def check(self) -> None:
        if self.rule not in DUAL_RULES:
            raise ValueError(f"dual must be one of {DUAL_RULES}, got {self.rule!r}")
        if self.psi not in TRANSFORMS or self.phi not in TRANSFORMS:
            raise ValueError(f"loss_transform must be one of {TRANSFORMS}, got {self.psi!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        _require(self.lr >= 0 and math.isfinite(self.lr), "dual_lr", self.lr, "a finite value >= 0")
        _require(self.famo_lr >= 0 and math.isfinite(self.famo_lr), "dual_lr", self.famo_lr, "a finite value >= 0")
        _require(self.w_init >= 0 and math.isfinite(self.w_init), "w_init", self.w_init, "a finite value >= 0")
        if self.w_max is not None:
            _require(math.isfinite(self.w_max) and self.w_max >= self.w_init, "w_max", self.w_max,
                     f"None or a finite value >= w_init ({self.w_init})")
        _require(math.isfinite(self.tolerance), "tolerance", self.tolerance, "a finite value")
        for name, bound in (("loss_lower_bounds[0]", self.lower_bound_f), ("loss_lower_bounds[1]", self.lower_bound_r)):
            _require(math.isfinite(bound), name, bound, "a finite value")


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}: {value!r} (expected {expected})")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "reference": {"psi": "log", "phi": "log", "scale_by_lr": False},
    "famo": {"psi": "log", "phi": "log", "scale_by_lr": False},
}


def preset(rule: str, **overrides: Any) -> DualConfig:
    """The preset's configuration; explicit (non-None) overrides win. Raises on invalid values."""
    if rule not in DUAL_RULES:
        raise ValueError(f"dual must be one of {DUAL_RULES}, got {rule!r}")
    cfg = DualConfig(rule=rule, **PRESETS[rule])
    known = {f.name for f in fields(DualConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"unknown dual option {key!r}")
        if value is not None:
            setattr(cfg, key, value)
    cfg.check()
    return cfg


# ---------------------------------------------------------------------------------- transforms


def check_log_argument(loss: Tensor, lower_bound: float, what: str) -> None:
    """A log transform needs loss - lower_bound + 1e-8 > 0 for finite losses.

    Non-finite losses pass: they make the step and its dual update skip (counted), which is the
    documented behaviour for a NaN loss. On CPU a finite, non-positive value raises here; on an
    accelerator an asynchronous device assertion carries the message, so the host never waits.
    """
    value = loss.detach()
    bad = torch.isfinite(value) & ~((value - lower_bound + LOG_OFFSET) > 0)
    hint = ("the log transform (loss_transform='log', used by the 'reference' and 'famo' dual presets) "
            f"needs {what} > its lower bound {lower_bound} (log of a non-positive value). A gradient-ascent "
            "forget loss is negative: use a positive forget loss (random labels, NPO), or "
            "loss_transform='identity' with dual='paper', or a lower bound below the loss")
    if value.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{hint}; got {what} = {value.reshape(-1).tolist()}")
    else:
        torch._assert_async(~bad.any(), hint)


def apply_transform(loss: Tensor, kind: str, lower_bound: float, what: str) -> Tensor:
    if kind == "identity":
        return loss
    check_log_argument(loss, lower_bound, what)
    return torch.log(loss - lower_bound + LOG_OFFSET)


# ---------------------------------------------------------------------------------- device state


class DualState:
    """Device tensors of the multiplier (or FAMO logits), their optimiser state and the skip counter."""

    KEYS = ("w", "adam_m", "adam_v", "adam_step", "logits", "famo_m", "famo_v", "famo_step", "skipped")

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
        self.skipped = torch.zeros((), **f32)

    def to_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load(self, values: dict[str, Tensor]) -> None:
        for k in self.KEYS:
            if k in values:
                current = getattr(self, k)
                setattr(self, k, values[k].detach().to(device=current.device, dtype=current.dtype).clone())


def _adam_descent(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float) -> tuple[Tensor, ...]:
    """One torch.optim.Adam step (coupled weight decay) on x along grad; returns new (x, m, v, step)."""
    grad = grad + weight_decay * x
    step = step + 1.0
    m = torch.lerp(m, grad, 1.0 - betas[0])
    v = v * betas[1] + (1.0 - betas[1]) * grad * grad
    t = step.double()
    bc1 = (1.0 - torch.pow(betas[0], t)).float()
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(betas[1], t)).float()
    return x - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps), m, v, step


def _commit(ok: Tensor, targets: list[Tensor], values: list[Tensor]) -> None:
    """targets <- values where ok (a device bool), else unchanged: no host read."""
    for target, value in zip(targets, values):
        target.copy_(torch.where(ok, value.to(target.dtype), target))


def _all_finite(*tensors: Tensor) -> Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


# ---------------------------------------------------------------------------------- the controller


class DualController:
    """Objective, per-step loss bookkeeping and the multiplier update of the implicit mode.

    Protocol per step: :meth:`objective` once per micro-batch (before the backward pass), then
    :meth:`end_step` after the optimizer's update with the step's learning rate, then either
    :meth:`update` with the retain loss re-evaluated after the step (exact) or nothing (the next
    :meth:`objective` uses its retain loss as the lagged value).
    """

    def __init__(self, cfg: DualConfig, data_parallel_group: Any = None) -> None:
        self.cfg = cfg
        self.data_parallel_group = data_parallel_group
        self.state: DualState | None = None
        self._before: Tensor | None = None  # float32[2]: mean (L_f, L_r) at theta_t of the last step
        self._sum: Tensor | None = None  # (L_f, L_r) summed over this step's micro-batches
        self._count = 0
        self._pending_lr: float | None = None  # the last step's lr while its dual update is due

    # -------------------------------------------------------------- objective

    def ensure_state(self, device: torch.device) -> DualState:
        if self.state is None:
            self.state = DualState(self.cfg, device)
        return self.state

    @property
    def observed_this_step(self) -> bool:
        return self._count > 0

    def objective(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        """J for one micro-batch; first runs a pending (lagged) dual update from ``retain_loss``."""
        if forget_loss.dim() != 0 or retain_loss.dim() != 0:
            raise ValueError("combine() expects scalar losses, got shapes "
                             f"{tuple(forget_loss.shape)} and {tuple(retain_loss.shape)}")
        if self.update_due:
            self._update(retain_loss, forget_loss)
        observed = torch.stack([forget_loss.detach(), retain_loss.detach()]).float()
        self._sum = observed if self._count == 0 else self._sum + observed
        self._count += 1
        st = self.ensure_state(forget_loss.device)
        if self.cfg.rule == "famo":
            return self._famo_objective(forget_loss, retain_loss, st)
        f = apply_transform(forget_loss, self.cfg.psi, self.cfg.lower_bound_f, "the forget loss")
        r = apply_transform(retain_loss, self.cfg.psi, self.cfg.lower_bound_r, "the retain loss")
        w = st.w.to(forget_loss.dtype)
        j = f + w * r
        return j / (1.0 + w) if self.cfg.weighting == "normalised" else j

    def _famo_shifted(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        """D_i = L_i - m_i + 1e-8 for (forget, retain), from Python-float bounds (no copy)."""
        cfg = self.cfg
        return torch.stack([forget_loss - cfg.lower_bound_f, retain_loss - cfg.lower_bound_r]) + LOG_OFFSET

    def _famo_objective(self, forget_loss: Tensor, retain_loss: Tensor, st: DualState) -> Tensor:
        d = self._famo_shifted(forget_loss, retain_loss)
        check_log_argument(d.min() - LOG_OFFSET, 0.0, "each loss minus its lower bound")
        z = torch.softmax(st.logits, 0).to(d.dtype)
        c = (z / d).sum().detach()
        return (z * torch.log(d)).sum() / c

    # -------------------------------------------------------------- step bookkeeping

    def end_step(self, lr: float) -> None:
        """After the model step: the step's mean losses become L(theta_t) of the next dual update.

        A step with lr == 0 moved nothing, so it gets no dual update (w stays as it was)."""
        if self._count == 0:
            return
        self._before = self._sum / self._count
        self._count = 0
        self._pending_lr = float(lr) if lr != 0 else None

    @property
    def update_due(self) -> bool:
        return self._pending_lr is not None and self._before is not None

    def update(self, retain_after: Tensor, forget_after: Tensor | None = None) -> None:
        """Exact dual update from L_r(theta_{t+1}) on the step's retain batch."""
        if self._before is None:
            raise RuntimeError("update_dual() must follow combine() and step()")
        if self._pending_lr is None:
            return  # the step's lr was 0, or the update already ran
        self._update(retain_after, forget_after)

    def _update(self, retain_after: Tensor, forget_after: Tensor | None) -> None:
        assert self._before is not None and self._pending_lr is not None
        if self.cfg.rule == "famo" and forget_after is None:
            raise ValueError("dual='famo' needs the forget loss after the step too: "
                             "update_dual(retain_loss_after, forget_loss_after)")
        st = self.ensure_state(self._before.device)
        after = [t.detach().float().reshape(()).to(st.w.device) for t in (retain_after, forget_after)
                 if t is not None]
        observed = torch.cat([self._before.to(st.w.device), torch.stack(after)])
        f0, r0, r1, *f1 = dist_util.mean_over_ranks(observed, self.data_parallel_group)  # one collective
        if self.cfg.rule == "famo":
            self._famo_update(torch.stack([f0, r0]), torch.stack([f1[0], r1]), st)
        else:
            self._multiplier_update(r0, r1, self._pending_lr, st)
        self._pending_lr = None

    def _multiplier_update(self, r0: Tensor, r1: Tensor, step_lr: float, st: DualState) -> None:
        cfg = self.cfg
        before = apply_transform(r0, cfg.phi, cfg.lower_bound_r, "the retain loss")
        after = apply_transform(r1, cfg.phi, cfg.lower_bound_r, "the retain loss after the step")
        scale = step_lr if cfg.scale_by_lr else 1.0
        delta = (before - after) / scale + cfg.tolerance
        if cfg.rule == "paper":
            raw = st.w - cfg.lr * delta
            targets, values = [st.w], [raw]
        else:
            raw, m, v, step = _adam_descent(st.w, delta, st.adam_m, st.adam_v, st.adam_step, cfg.lr, cfg.adam_betas,
                                            cfg.adam_eps, cfg.adam_weight_decay)
            targets, values = [st.w, st.adam_m, st.adam_v, st.adam_step], [raw, m, v, step]
        ok = _all_finite(delta, *values)
        values[0] = torch.clamp(raw, min=0.0, max=cfg.w_max)
        _commit(ok, targets, values)
        st.skipped.add_((~ok).float())

    def _famo_update(self, before: Tensor, after: Tensor, st: DualState) -> None:
        cfg = self.cfg
        delta = torch.log(self._famo_shifted(*before)) - torch.log(self._famo_shifted(*after))
        z = torch.softmax(st.logits, 0)
        grad = z * (delta - (z * delta).sum())
        values = list(_adam_descent(st.logits, grad, st.famo_m, st.famo_v, st.famo_step, cfg.famo_lr,
                                    cfg.adam_betas, cfg.adam_eps, cfg.famo_weight_decay))
        ok = _all_finite(delta, *values)
        _commit(ok, [st.logits, st.famo_m, st.famo_v, st.famo_step], values)
        st.skipped.add_((~ok).float())

    # -------------------------------------------------------------- state and stats

    @property
    def w(self) -> Tensor | None:
        return None if self.state is None else self.state.w

    def stats(self) -> dict[str, Tensor]:
        if self.state is None:
            return {}
        out = {"w": self.state.w, "dual_skipped": self.state.skipped}
        if self.cfg.rule == "famo":
            out["famo_weights"] = torch.softmax(self.state.logits, 0)
        return out

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"rule": self.cfg.rule, "pending_lr": self._pending_lr}
        if self.state is not None:
            sd["dual"] = self.state.to_dict()
        if self._before is not None:
            sd["losses"] = self._before
        if self._count:  # combine() ran since the last step: its losses belong to the coming step
            sd["step_losses"], sd["step_count"] = self._sum, self._count
        return sd

    def load_state_dict(self, sd: dict[str, Any], device: torch.device) -> None:
        saved_rule = sd.get("rule", self.cfg.rule)
        if saved_rule != self.cfg.rule:
            raise ValueError(f"the checkpoint's multiplier follows dual={saved_rule!r}, but this optimizer "
                             f"was built with dual={self.cfg.rule!r}")
        self._pending_lr = sd.get("pending_lr")
        if "dual" in sd:
            self.ensure_state(device).load(sd["dual"])
        losses = sd.get("losses")
        if isinstance(losses, (tuple, list)):  # older checkpoints stored (L_f, L_r) as two scalars
            losses = torch.stack([torch.as_tensor(t).reshape(()) for t in losses])
        self._before = None if losses is None else losses.detach().float().clone().to(device)
        self._count = int(sd.get("step_count", 0))
        self._sum = sd["step_losses"].detach().clone().to(device) if self._count else None
