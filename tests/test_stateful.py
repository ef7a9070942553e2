"""Random sequences of optimizer calls against a float64 model of the same optimizer.

Hypothesis drives zero_grad / backward / stash / combine / step / update_dual / lr changes /
state_dict round trips / add_param_group in any order a user could write them, in both modes,
and after every call compares the parameters, step counts and multiplier with a plain float64
model built from ``eupmu_kernels.reference``. Calls that break the protocol must raise, and the
model says which.

Losses are quadratics of a random subset of the parameters, so gradients are known exactly and
some parameters get no gradient at all (``torch.optim`` leaves those alone).
"""

from __future__ import annotations

import copy
import io
import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eupmu_kernels import EUPMU
from eupmu_kernels import reference as ref

OFFSET = 0.5  # keeps every loss positive, so the log transforms are defined
RULE_HP = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": dict(lr=0.05, momentum=0.5, nesterov=True),
    "adam": dict(lr=0.02, weight_decay=0.01),
    "adamw": dict(lr=0.02, weight_decay=0.1),
}
SHAPES = [(3,), (2, 2), (5,), (1,)]


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Model:
    """The float64 oracle: parameters, per-parameter rule state, gradients, the multiplier."""

    def __init__(self, rule: str, hp: dict, cfg: dict) -> None:
        self.rule = rule.split("_")[0]
        self.cfg = cfg
        self.groups: list[dict] = []  # hyperparameters per group, with the indices of its params
        self.values: list[torch.Tensor] = []
        self.state: dict[int, ref.RuleState] = {}
        self.base_hp = {k: v for k, v in hp.items() if k != "lr"}
        self.grad: dict[int, torch.Tensor] = {}  # .grad: g_f (explicit) or the combined gradient
        self.retain: dict[int, torch.Tensor] = {}
        self.armed = False
        self.captured = False
        # implicit mode
        self.w = cfg.get("w_init", 0.0)
        self.adam = ref.AdamScalarState()
        self.sums: list[tuple[float, float]] = []
        self.before: tuple[float, float] | None = None
        self.pending_lr: float | None = None

    # -------------------------------------------------------------- explicit protocol

    def zero_grad(self) -> None:
        self.grad, self.retain = {}, {}
        self.armed = self.cfg["mode"] == "explicit" and self.cfg.get("retain_capture") == "views"
        self.captured = False

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        """Autograd accumulates into .grad, which points into the retain buffer while armed."""
        target = self.retain if self.armed else self.grad
        for i, g in grads.items():
            target[i] = target[i] + g if i in target else g.clone()

    def stash(self) -> None:
        if not self.armed:  # .grad (whatever it holds) becomes retain gradient
            for i, g in self.grad.items():
                self.retain[i] = self.retain[i] + g if i in self.retain else g.clone()
        self.grad = {}
        self.armed = False
        self.captured = True

    # -------------------------------------------------------------- implicit protocol

    def combine(self, f: float, r: float) -> None:
        if self.pending_lr is not None and self.before is not None:
            self._dual(r)
        self.sums.append((f, r))

    def update_dual(self, r_after: float) -> None:
        if self.pending_lr is not None:
            self._dual(r_after)

    def _dual(self, r1: float) -> None:
        r0 = self.before[1]
        cfg = self.cfg
        if cfg["dual"] == "paper":
            delta = ref.dual_delta(r0, r1, cfg["tolerance"], scale=self.pending_lr)
            self.w = ref.paper_dual_update(self.w, delta, cfg["dual_lr"])
        else:
            self.w = ref.reference_dual_update(self.w, r0, r1, err=-cfg["tolerance"], beta=cfg["dual_lr"], st=self.adam)
        self.pending_lr = None

    # -------------------------------------------------------------- the step

    def participating(self) -> list[int]:
        return sorted(set(self.grad) | set(self.retain))

    def step(self) -> None:
        idx = self.participating()
        if idx:
            self._update(idx)
        self.captured = False
        self.retain = {}  # used up; the next stash starts a new retain gradient
        if self.cfg["mode"] == "implicit" and self.sums:
            n = len(self.sums)
            self.before = (sum(f for f, _ in self.sums) / n, sum(r for _, r in self.sums) / n)
            self.sums = []
            lr = self.groups[0]["lr"]
            self.pending_lr = lr if lr != 0 else None

    def _update(self, idx: list[int]) -> None:
        zeros = {i: torch.zeros_like(self.values[i]) for i in idx}
        g_f = torch.cat([self.grad.get(i, zeros[i]).reshape(-1) for i in idx])
        g_r = torch.cat([self.retain.get(i, zeros[i]).reshape(-1) for i in idx])
        if not (torch.isfinite(g_f).all() and torch.isfinite(g_r).all()):
            return  # skipped on the device: nothing changes
        cfg = self.cfg
        if cfg["mode"] == "explicit":
            d = ref.surgery(g_f, g_r, cfg["surgery"], eps=cfg["tolerance"], alpha=cfg["alpha"],
                            max_norm=cfg["max_grad_norm"])
        else:
            d = g_f * ref.clip_factor(float(g_f.norm()), cfg["max_grad_norm"])
        offset = 0
        for i in idx:
            n = self.values[i].numel()
            group = next(g for g in self.groups if i in g["params"])
            hp = {k: v for k, v in group.items() if k != "params"}
            st_i = self.state.setdefault(i, ref.RuleState())
            new = ref.rule_step(self.rule, self.values[i], d[offset:offset + n], st_i, **hp)
            self.values[i] = new.reshape(self.values[i].shape)
            offset += n


class OptimizerMachine(RuleBasedStateMachine):
    """One optimizer and its model; subclasses pick the mode."""

    MODE = "explicit"

    def __init__(self) -> None:
        super().__init__()
        self.params: list[torch.nn.Parameter] = []
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gen = torch.Generator().manual_seed(0)

    # -------------------------------------------------------------- set-up

    def _build(self, rule: str, cfg: dict) -> None:
        self.rule_key, self.cfg = rule, cfg
        self.hp = RULE_HP[rule]
        self.model = Model(rule, self.hp, cfg)
        self._new_param()
        self._new_param()
        self.opt = self._make_optimizer([self.params[0], self.params[1]])
        self.model.groups.append({"params": [0, 1], **self.hp})

    def _make_optimizer(self, params) -> EUPMU:
        kwargs = {k: v for k, v in self.cfg.items() if k != "mode"}
        return EUPMU(params, rule=self.rule_key.split("_")[0], mode=self.MODE, backend="torch", **self.hp,
                     **kwargs)

    def _new_param(self) -> int:
        i = len(self.params)
        shape = SHAPES[i % len(SHAPES)]
        value = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        self.params.append(torch.nn.Parameter(value.clone()))
        self.targets.append((torch.randn(shape, generator=self.gen, dtype=torch.float64),
                             torch.randn(shape, generator=self.gen, dtype=torch.float64)))
        self.model.values.append(value.clone())
        return i

    # -------------------------------------------------------------- losses

    def _members(self, mask: int) -> list[int]:
        chosen = [i for i in range(len(self.params)) if (mask >> i) & 1]
        return chosen or [0]

    def _loss(self, which: int, members: list[int], scale: float) -> torch.Tensor:
        return scale * sum(((self.params[i] - self.targets[i][which]) ** 2).sum() for i in members) + OFFSET

    def _model_loss(self, which: int, members: list[int], scale: float) -> tuple[float, dict[int, torch.Tensor]]:
        value = scale * sum(float(((self.model.values[i] - self.targets[i][which]) ** 2).sum()) for i in members)
        grads = {i: 2.0 * scale * (self.model.values[i] - self.targets[i][which]) for i in members}
        return value + OFFSET, grads

    # -------------------------------------------------------------- shared rules

    @rule()
    def zero_grad(self) -> None:
        self.opt.zero_grad()
        self.model.zero_grad()

    @rule(group=st.integers(0, 2), lr=st.sampled_from([0.0, 0.01, 0.05]))
    def set_lr(self, group: int, lr: float) -> None:
        group = min(group, len(self.opt.param_groups) - 1)
        self.opt.param_groups[group]["lr"] = lr
        self.model.groups[group]["lr"] = lr

    @precondition(lambda self: not self.model.captured and not self.model.grad and not self.model.armed
                  and len(self.params) < 4)
    @rule(lr=st.sampled_from([0.01, 0.03]))
    def add_param_group(self, lr: float) -> None:
        i = self._new_param()
        self.opt.add_param_group({"params": [self.params[i]], "lr": lr})
        self.model.groups.append({"params": [i], **self.hp, "lr": lr})

    @precondition(lambda self: bool(self.model.grad) and not self.model.armed)
    @rule()
    def poison_grad(self) -> None:
        """A NaN in .grad: the next step must be skipped on the device, nothing else may change."""
        i = min(self.model.grad)
        self.params[i].grad.view(-1)[0] = float("nan")
        self.model.grad[i] = self.model.grad[i].clone()
        self.model.grad[i].view(-1)[0] = float("nan")

    @precondition(lambda self: not self.model.captured and not self.model.grad and not self.model.armed)
    @rule()
    def save_and_reload(self) -> None:
        sd = roundtrip(self.opt.state_dict())
        fresh = self._make_optimizer([self.params[0], self.params[1]])
        for group in self.opt.param_groups[1:]:
            fresh.add_param_group({"params": group["params"], "lr": group["lr"]})
        fresh.load_state_dict(copy.deepcopy(sd))
        self.opt = fresh

    # -------------------------------------------------------------- invariants

    @invariant()
    def parameters_match_the_model(self) -> None:
        # The coefficients (lambda*, the clip factor) and w are float32 on the device, so each step's
        # update carries a relative error of about 2^-24 against the float64 model (implicit mode: w
        # also moves by float32 loss differences divided by lr, hence the wider tolerance there).
        rtol = 1e-6 if self.MODE == "explicit" else 1e-4
        for p, v in zip(self.params, self.model.values):
            assert torch.allclose(p.detach(), v, rtol=rtol, atol=rtol), (p, v)

    @invariant()
    def step_counts_match_the_model(self) -> None:
        for i, p in enumerate(self.params):
            expected = self.model.state[i].step if i in self.model.state else 0
            got = int(self.opt.state[p]["step"].item()) if "step" in self.opt.state.get(p, {}) else 0
            assert got == expected, (i, got, expected)


class ExplicitMachine(OptimizerMachine):
    MODE = "explicit"

    @initialize(rule_key=st.sampled_from(list(RULE_HP)), surgery=st.sampled_from(["ungrad", "pcgrad", "graddiff"]),
                tolerance=st.sampled_from([0.0, 0.5]), max_grad_norm=st.sampled_from([None, 0.7]),
                capture=st.sampled_from(["views", "copy", "reference"]), in_backward=st.booleans())
    def setup(self, rule_key, surgery, tolerance, max_grad_norm, capture, in_backward) -> None:
        self._build(rule_key, dict(mode="explicit", surgery=surgery, tolerance=tolerance, alpha=0.5,
                                   max_grad_norm=max_grad_norm, retain_capture=capture,
                                   gramian_in_backward="auto" if in_backward else False))

    @rule(mask=st.integers(1, 15), scale=st.sampled_from([0.5, 1.0]))
    def retain_backward(self, mask: int, scale: float) -> None:
        members = self._members(mask)
        self._loss(1, members, scale).backward()
        self.model.backward(self._model_loss(1, members, scale)[1])

    @rule()
    def stash(self) -> None:
        self.opt.stash_retain_grad()
        self.model.stash()

    @rule(mask=st.integers(1, 15), scale=st.sampled_from([1.0, 2.0]))
    def forget_backward(self, mask: int, scale: float) -> None:
        members = self._members(mask)
        (-self._loss(0, members, scale)).backward()
        grads = {i: -g for i, g in self._model_loss(0, members, scale)[1].items()}
        self.model.backward(grads)

    @rule()
    def step(self) -> None:
        if not self.model.captured:
            try:
                self.opt.step()
            except RuntimeError as exc:
                assert "needs a retain gradient" in str(exc)
                return
            raise AssertionError("step() without a retain gradient must raise")
        self.opt.step()
        self.model.step()
        self.model.armed = False


class ImplicitMachine(OptimizerMachine):
    MODE = "implicit"

    @initialize(rule_key=st.sampled_from(list(RULE_HP)), dual=st.sampled_from(["paper", "reference"]),
                tolerance=st.sampled_from([0.0, 0.05]), max_grad_norm=st.sampled_from([None, 0.7]),
                w_init=st.sampled_from([0.0, 0.5]))
    def setup(self, rule_key, dual, tolerance, max_grad_norm, w_init) -> None:
        self._build(rule_key, dict(mode="implicit", dual=dual, dual_lr=0.2, tolerance=tolerance,
                                   max_grad_norm=max_grad_norm, w_init=w_init))

    @rule(mask_f=st.integers(1, 15), mask_r=st.integers(1, 15))
    def combine_and_backward(self, mask_f: int, mask_r: int) -> None:
        f_members, r_members = self._members(mask_f), self._members(mask_r)
        f, r = self._loss(0, f_members, 1.0), self._loss(1, r_members, 1.0)
        mf, gf = self._model_loss(0, f_members, 1.0)
        mr, gr = self._model_loss(1, r_members, 1.0)
        self.model.combine(mf, mr)  # may run the lagged dual update first: w before the objective
        self.opt.combine(f, r).backward()
        w = self.model.w
        if self.cfg["dual"] == "reference":  # psi = log: the gradient of log L is grad L / L
            gf = {i: g / mf for i, g in gf.items()}
            gr = {i: g / mr for i, g in gr.items()}
        combined = dict(gf)
        for i, g in gr.items():
            combined[i] = combined[i] + w * g if i in combined else w * g
        self.model.backward(combined)

    @rule()
    def step(self) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a step without combine() warns once, as it should
            self.opt.step()
        self.model.step()

    @rule(mask=st.integers(1, 15))
    def update_dual(self, mask: int) -> None:
        members = self._members(mask)
        if self.model.before is None:
            try:
                self.opt.update_dual(self._loss(1, members, 1.0).detach())
            except RuntimeError as exc:
                assert "must follow" in str(exc)
                return
            raise AssertionError("update_dual() before any step must raise")
        with torch.no_grad():
            self.opt.update_dual(self._loss(1, members, 1.0))
        self.model.update_dual(self._model_loss(1, members, 1.0)[0])

    @invariant()
    def multiplier_matches_the_model(self) -> None:
        if self.opt.w is not None:
            assert math.isclose(self.opt.w.item(), self.model.w, rel_tol=1e-4, abs_tol=1e-5), \
                (self.opt.w.item(), self.model.w)


PROFILE = settings(max_examples=60, stateful_step_count=40, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestExplicitMode = ExplicitMachine.TestCase
TestExplicitMode.settings = PROFILE
TestImplicitMode = ImplicitMachine.TestCase
TestImplicitMode.settings = PROFILE
