"""``EUPMU``: a drop-in ``torch.optim.Optimizer`` for utility-preserving unlearning.

Explicit mode (unilateral gradient surgery, two backward passes)::

    opt.zero_grad()
    retain_loss.backward()
    opt.stash_retain_grad()          # g_r moves into the optimizer's flat buffer
    forget_loss.backward()           # .grad now holds g_f
    opt.step()                       # d = g_f + lambda* g_r, then the base rule

Implicit mode (one backward pass, a dual multiplier on the device)::

    opt.zero_grad()
    opt.combine(forget_loss, retain_loss).backward()
    opt.step()
    opt.update_dual(retain_loss_after_step)   # optional: else the next combine() uses a lagged value
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from . import amp, dispatch
from . import distributed as dist_util
from .buckets import DEFAULT_BUCKET_NUMEL, Bucket, build_buckets
from .backward_gramian import FORGET, RETAIN, BackwardGramian
from .capture import RetainCapture
from .coefficients import unscaled
from .contract import CLIP, COS, LAM, SKIP, TERM_K0, TERM_T0, A, RuleStateLists
from .dual import DualConfig, DualController, preset
from .ops import make_config, sum_gramians
from .rules import BaseRule, get_rule
from .rules.base import check_number
from .surgery import EXPLICIT_SURGERIES
from .validation import check_gradient

MODES = ("implicit", "explicit")
SURGERY_SPACES = ("gradient", "update")
_RULE_ARGUMENTS = {"betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.0, "dampening": 0.0, "nesterov": False}


class EUPMU(torch.optim.Optimizer):
    """Unlearning optimizer: gradient surgery (explicit) or implicit surgery (one backward pass).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer; ``(name,
            parameter)`` pairs (``model.named_parameters()``) make errors name the parameters and
            are kept as ``param_names`` in the state dict, as ``torch.optim`` does.
        lr, weight_decay: per group, ``torch.optim`` meanings (``weight_decay`` defaults to 1e-2
            for adamw and 0 otherwise).
        betas, eps: Adam/AdamW only; momentum, dampening, nesterov: SGD only (``torch.optim``
            defaults). Setting one that the rule does not use is an error.
        rule: base update rule, ``"adamw"``, ``"adam"`` or ``"sgd"``.
        mode: ``"implicit"`` (one backward pass through :meth:`combine`) or ``"explicit"``.
        surgery: explicit-mode rule, ``"ungrad"`` (unilateral, default), ``"pcgrad"``, ``"graddiff"``.
        tolerance: epsilon, the tolerated first-order retain-loss increase per unit step.
        surgery_space: where explicit UNGrad enforces <., g_r> >= -tolerance: ``"gradient"`` (on the
            combined gradient d, the paper's formulation) or ``"update"`` (on the update the base
            rule actually applies, momentum, Adam's moments and weight decay included, so that
            <theta_{t+1} - theta_t, g_r> <= lr * tolerance; docs/design.md, Update-space surgery).
            ``stats()["retain_change"]`` then reports that first-order change, measured.
        alpha: the retain weight of ``"graddiff"``.
        max_grad_norm: clip the final direction to this global norm (no extra memory pass in
            explicit mode; one norm reduction in implicit mode).
        dual: implicit-mode multiplier rule: ``"reference"`` (default: the authors' published
            practice, log losses and one Adam step on w; it gave the best trade-off on the
            project's end-to-end benchmark), ``"paper"`` (projected dual ascent on
            delta = (L_r(t) - L_r(t+1)) / lr + tolerance) or ``"famo"`` (FAMO weighting baseline).
            The log transform of the default needs positive losses: use a random-label or NPO
            forget loss, or ``dual="paper"`` for a negative (gradient-ascent) forget loss.
        dual_lr: the multiplier's step size beta (default 1.0; FAMO: 0.025). With ``"paper"``
            the rule diverges once beta * ||g_r||^2 > 2 (w grows without bound): pick beta
            accordingly or cap w with ``w_max``.
        w_max: optional upper bound on w (projection onto [0, w_max]).
        w_init: initial multiplier w.
        loss_transform: ``"identity"`` or ``"log"`` for psi and phi (default per dual preset).
        weighting: ``"unnormalised"`` (J = f + w r) or ``"normalised"`` (J = (f + w r) / (1 + w)).
        dual_step_scale: ``"lr"`` (delta divided by the step's lr, the paper) or ``"one"``.
        loss_lower_bounds: (m_f, m_r), known lower bounds used by the log transform.
        skip_nonfinite: skip (on the device) and count steps whose gradients are not finite.
            Implicit mode without clipping skips its one reduction pass when this is False.
        state_dtype: dtype of optimizer state (e.g. ``torch.float32`` for bf16 parameters);
            default: the parameter's dtype, like ``torch.optim``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (the compiled extension;
            ``"cuda"`` is its deprecated former name); default: the ``EUPMU_BACKEND`` environment
            variable, else auto.
        bucket_numel: maximal elements per bucket of the retain-gradient buffer.
        retain_capture: how explicit mode keeps g_r (docs/design.md, Retain capture):
            ``"reference"`` keeps the tensors autograd made for the retain pass (no copy, no
            zeroing); ``"views"`` has :meth:`zero_grad` point each ``.grad`` at its view of a flat
            buffer, so the retain pass accumulates there; ``"copy"`` copies ``.grad`` into that
            buffer at :meth:`stash_retain_grad`. ``"auto"`` (default): ``"reference"``.
        retain_grad_views: the former switch between ``"views"`` (True) and ``"copy"`` (False).
        gramian_in_backward: form the Gramian in post-accumulate-grad hooks during the backward
            passes (docs/design.md, Gramian in the backward pass) instead of in the step;
            ``"auto"`` (default) does so wherever the hooks can see the final gradients (not
            under multi-rank data parallelism, not for sharded parameters, not with
            ``retain_capture="views"``); the step falls back on its own pass whenever a slot
            does not describe the gradients it uses.
        process_group: for ZeRO-style sharded flat parameters: the group whose ranks each hold
            a shard; the Gramian is all-reduced over it. DTensor (FSDP2) parameters need nothing:
            their mesh says how they are sharded.
        data_parallel_group: group over which the loss scalars driving the multiplier are
            averaged; ``"auto"`` (default) uses the default group when more than one rank runs.
        grad_scaler: the ``torch.amp.GradScaler`` driving this optimizer, if any. Needed in
            explicit mode when ``scaler.unscale_(opt)`` is called before ``scaler.step(opt)``
            (the retain buffer is then unscaled here), and lets a retain-gradient overflow back
            off the scale like a forget-gradient overflow does.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        rule: str = "adamw",
        mode: str = "implicit",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        momentum: float | None = None,
        dampening: float | None = None,
        nesterov: bool | None = None,
        surgery: str = "ungrad",
        tolerance: float = 0.0,
        surgery_space: str = "gradient",
        alpha: float = 1.0,
        max_grad_norm: float | None = None,
        dual: str = "reference",
        dual_lr: float | None = None,
        w_init: float = 0.0,
        w_max: float | None = None,
        loss_transform: str | None = None,
        weighting: str = "unnormalised",
        dual_step_scale: str | None = None,
        loss_lower_bounds: tuple[float, float] = (0.0, 0.0),
        skip_nonfinite: bool = True,
        state_dtype: torch.dtype | None = None,
        backend: str | None = None,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        retain_capture: str = "auto",
        retain_grad_views: bool | None = None,
        gramian_in_backward: str | bool = "auto",
        process_group: Any = None,
        data_parallel_group: Any = "auto",
        grad_scaler: Any = None,
    ) -> None:
        base_rule = get_rule(rule)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if surgery not in EXPLICIT_SURGERIES:
            raise ValueError(f"surgery must be one of {EXPLICIT_SURGERIES}, got {surgery!r}")
        if surgery_space not in SURGERY_SPACES:
            raise ValueError(f"surgery_space must be one of {SURGERY_SPACES}, got {surgery_space!r}")
        if surgery_space == "update" and (mode != "explicit" or surgery != "ungrad"):
            raise ValueError("surgery_space='update' applies to mode='explicit' with surgery='ungrad' (PCGrad and "
                             "GradDiff are fixed baselines defined on gradients)")
        if dual_step_scale not in (None, "lr", "one"):
            raise ValueError(f"dual_step_scale must be 'lr' or 'one', got {dual_step_scale!r}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"bucket_numel must be an int >= 1, got {bucket_numel!r}")
        check_number(tolerance, "tolerance", "EUPMU", low=0.0 if mode == "explicit" else -float("inf"))
        check_number(alpha, "alpha", "EUPMU", low=-float("inf"))
        if max_grad_norm is not None:
            check_number(max_grad_norm, "max_grad_norm", "EUPMU")
            if max_grad_norm == 0:
                raise ValueError("EUPMU: invalid max_grad_norm 0 (expected a positive value or None)")

        given = dict(betas=betas, eps=eps, momentum=momentum, dampening=dampening, nesterov=nesterov)
        defaults: dict[str, Any] = {"lr": lr, **base_rule.default_hyperparameters()}
        for key, value in given.items():
            if value is None:
                continue
            if key in defaults:
                defaults[key] = tuple(value) if key == "betas" else value
            elif value != _RULE_ARGUMENTS[key]:
                raise ValueError(f"EUPMU: {key}={value!r} has no effect with rule={rule!r}")
        if weight_decay is not None:
            defaults["weight_decay"] = weight_decay

        self.rule = rule
        self.base_rule: BaseRule = base_rule
        self.mode = mode
        super().__init__(params, defaults)

        self.surgery_config = make_config(surgery if mode == "explicit" else "none",
                                          tolerance if mode == "explicit" else 0.0, alpha, max_grad_norm)
        self.surgery_space = surgery_space
        self.skip_nonfinite = bool(skip_nonfinite)
        self.state_dtype = state_dtype
        self.backend = dispatch.requested_backend(backend)
        self.bucket_numel = bucket_numel
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self.dual = DualController(
            _dual_config(dual, dual_lr, w_init, w_max, loss_transform, dual_step_scale, weighting, tolerance,
                         loss_lower_bounds),
            dist_util.resolve_data_parallel_group(data_parallel_group))
        self.capture = RetainCapture(_capture_mode(retain_capture, retain_grad_views))
        if gramian_in_backward not in ("auto", True, False):
            raise ValueError(f"gramian_in_backward must be 'auto', True or False, got {gramian_in_backward!r}")
        self.gramian_in_backward = gramian_in_backward
        self.backward_gramian = BackwardGramian()
        self.gramian_source: str | None = None  # where the last step's Gramian came from: "backward" or "step"
        self._hooks: list = []

        self._buckets: list[Bucket] | None = None
        self._stats: dict[str, Tensor] = {}
        self._skipped: Tensor | None = None
        self._warned_no_combine = False
        self._get_buckets()  # hooks in place before the first backward pass
        for bucket in self._buckets or ():
            self._step_backend(bucket)  # a backend without update-space kernels is refused here

    # ------------------------------------------------------------------ configuration

    @property
    def dual_config(self) -> DualConfig:
        return self.dual.cfg

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if params and isinstance(params[0], tuple):
            group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        group["params"] = params
        for key in _RULE_ARGUMENTS:
            if key in group and key not in self.defaults and group[key] != _RULE_ARGUMENTS[key]:
                raise ValueError(f"EUPMU: param group sets {key}={group[key]!r}, which has no effect with "
                                 f"rule={self.rule!r}")
        super().add_param_group(group)
        self.base_rule.check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        if getattr(self, "_buckets", None) is not None:
            self.capture.disarm()
            self._buckets = None
            self._get_buckets()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (mode={self.mode!r}, rule={self.rule!r}, backend={self.backend!r}"]
        if self.mode == "explicit":
            cfg = self.surgery_config
            lines.append(f"    surgery={cfg.method!r}, tolerance={cfg.tolerance}"
                         + (f", alpha={cfg.alpha}" if cfg.method == "graddiff" else ""))
        else:
            d = self.dual.cfg
            lines.append(f"    dual={d.rule!r}, dual_lr={d.famo_lr if d.rule == 'famo' else d.lr}, "
                         f"tolerance={d.tolerance}, w_init={d.w_init}, w_max={d.w_max}, "
                         f"loss_transform={d.psi!r}, weighting={d.weighting!r}")
        lines.append(f"    max_grad_norm={self.surgery_config.max_norm}, skip_nonfinite={self.skip_nonfinite}, "
                     f"state_dtype={self.state_dtype})")
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k not in ("params", "param_names")):
                lines.append(f"    {key}: {group[key]}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ buckets

    def _get_buckets(self) -> list[Bucket]:
        if self._buckets is None:
            self._buckets = build_buckets(
                self.param_groups, self._names_by_id(),
                lambda device, dtype: dispatch.get_backend(self.backend, device, dtype), self.bucket_numel,
                lambda p: dist_util.shard_group(p, self.process_group))
            hooked = self._install_hooks(self._buckets)
            self.capture.bind(self._buckets, hooked)
            self.backward_gramian.bind(self._buckets)
        return self._buckets

    def _install_hooks(self, buckets: list[Bucket]) -> set[int]:
        """One post-accumulate-grad hook per plain trainable parameter (weakly bound to self)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        ref = weakref.ref(self)

        def on_accumulate(p: Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._on_accumulate(p)

        hooked = set()
        for bucket in buckets:
            for p in bucket.params:
                if p.requires_grad and not dist_util.is_dtensor(p):
                    self._hooks.append(p.register_post_accumulate_grad_hook(on_accumulate))
                    hooked.add(id(p))
        return hooked

    def _on_accumulate(self, p: Tensor) -> None:
        if self.mode == "explicit":
            self.capture.reached(p)
        grad = p.grad
        if not self._backward_gramian_on() or grad is None or grad.layout != torch.strided \
                or grad.dtype != p.dtype or grad.device != p.device:
            return  # the step validates such a gradient and reports it by name
        if self.mode == "implicit":
            self.backward_gramian.record(p, FORGET, p.grad, None)
        elif not self.capture.captured or self.capture.in_retain_pass:
            self.backward_gramian.record(p, RETAIN, p.grad, None)
        else:
            self.backward_gramian.record(p, FORGET, p.grad, self.capture.grad_r_of(p))

    def _backward_gramian_on(self) -> bool:
        if self.gramian_in_backward is False:
            return False
        if self.mode == "explicit" and self.capture.mode == "views":
            return False  # the views share one version counter: slots could not be checked
        if self.mode == "implicit" and not (self.skip_nonfinite or self.surgery_config.max_norm is not None):
            return False  # the step needs no Gramian
        if self.gramian_in_backward is True:
            return True
        return self.process_group is None and not dist_util.multi_rank()

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """The parameter buckets (built on first use): their layout, and in explicit mode the retain buffer."""
        return tuple(self._get_buckets())

    def _names_by_id(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for group in self.param_groups:
            for name, p in zip(group.get("param_names", ()), group["params"]):
                names[id(p)] = name
        return names

    def _describe(self, p: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return f"parameter {names[pi]!r}" if names else f"parameter 'group {gi} param #{pi}'"
        return "an unknown parameter"

    # ------------------------------------------------------------------ retain gradient (explicit mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the forget/combined gradients (``.grad``) and the retain buffer.

        In explicit mode with ``retain_grad_views`` (default) each ``.grad`` is then pointed at
        its zeroed view of the retain buffer, so the next backward pass (the retain loss) is
        captured without a copy; :meth:`stash_retain_grad` then detaches it.
        """
        self.capture.disarm()
        super().zero_grad(set_to_none=set_to_none)
        self.backward_gramian.reset()
        if self.mode != "explicit":
            return
        self._get_buckets()
        self.capture.clear()

    def stash_retain_grad(self) -> None:
        """Take the current ``.grad`` as (a further micro-batch of) the retain gradient.

        The retain buffer accumulates across calls until the next :meth:`step` or
        :meth:`zero_grad`; ``.grad`` is cleared so the forget backward pass starts from zero.
        Call it after all retain backward passes and before any forget backward pass (use
        :meth:`retain_grad` to interleave micro-batches). A parameter whose gradient stayed None
        has no retain gradient, as in ``torch.optim``.
        """
        self._require_mode("explicit", "stash_retain_grad()")
        self._get_buckets()
        self.capture.stash(self._describe)

    def retain_grad(self) -> Iterator[None]:
        """Context manager: backward passes inside it accumulate into the retain buffer (no copy).

        ``.grad`` (the forget gradient accumulated so far) is set aside on entry and restored on
        exit, so retain and forget micro-batches may be interleaved freely.
        """
        self._require_mode("explicit", "retain_grad()")
        self._get_buckets()
        return self.capture.accumulate()

    def retain_grads(self) -> list[Tensor | None]:
        """The captured retain gradient per parameter, in param-group order (None where absent).

        Views of the optimizer's buffer, valid until the next :meth:`step` or :meth:`zero_grad`."""
        self._require_mode("explicit", "retain_grads()")
        out: dict[int, Tensor | None] = {}
        for bucket in self._get_buckets():
            for i, p in enumerate(bucket.params):
                out[id(p)] = self.capture.grad_r(bucket, i)
        return [out.get(id(p)) for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ implicit mode

    def combine(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        """The one-backward objective J = psi(L_f) + w psi(L_r) (or FAMO's), with w on the device.

        If the previous step's dual update is still pending, ``retain_loss`` (evaluated at the
        new parameters) serves as the lagged L_r(theta_{t+1}) for it first.
        """
        self._require_mode("implicit", "combine()")
        return self.dual.objective(forget_loss, retain_loss)

    def update_dual(self, retain_loss_after: Tensor, forget_loss_after: Tensor | None = None) -> None:
        """Exact dual update from L_r(theta_{t+1}) on the same retain batch (no-grad forward)."""
        self._require_mode("implicit", "update_dual()")
        self.dual.update(retain_loss_after, forget_loss_after)

    @property
    def w(self) -> Tensor | None:
        """The multiplier w (device tensor), or None before the first combine()."""
        return self.dual.w

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        explicit = self.mode == "explicit"
        if explicit and not self.capture.captured:
            raise RuntimeError("EUPMU(mode='explicit').step() needs a retain gradient: call "
                               "retain_loss.backward(); opt.stash_retain_grad() before forget_loss.backward()")
        if not explicit:
            self._warn_if_uncombined()
        hypers = [self.base_rule.step_hyper(g) for g in self._checked_groups()]
        in_update_space = self.surgery_space == "update"
        if in_update_space:
            hypers = [dataclasses.replace(h, uncorrected_preconditioner=True) for h in hypers]
        work = self._collect()
        if work:
            if explicit:
                amp.unscale_retain_if_grads_were_unscaled(self, self.capture.retain_buffers())
            launches = [(bucket, [dist_util.local_view(bucket.params[i]) for i in idx], grads_f, grads_r,
                         self._rule_state(bucket, [bucket.params[i] for i in idx]), hypers[bucket.group_index])
                        for bucket, idx, grads_f, grads_r in work]
            if in_update_space:
                coef, gram, theta_r = self._update_space_coefficients(work, launches, hypers[0].lr)
            else:
                coef, gram = self._coefficients(work)
            for bucket, params, grads_f, grads_r, state, hp in launches:
                self._step_backend(bucket).step_(self.rule, params, grads_f, grads_r, state,
                                                 coef.to(bucket.device, non_blocking=True), hp)
            self._record_stats(gram, coef)
            if in_update_space:
                self._record_retain_change(launches, theta_r, hypers[0].lr)
            amp.report_overflow(self, coef[SKIP])
        self.capture.release()
        self.backward_gramian.reset()
        if not explicit:
            self.dual.end_step(hypers[0].lr if hypers else 0.0)
        return loss

    def _checked_groups(self) -> list[dict[str, Any]]:
        """Groups as the step will read them (a scheduler may have changed lr): validated again."""
        for i, group in enumerate(self.param_groups):
            self.base_rule.check_group(group, f"param group {i}")
        return self.param_groups

    def _warn_if_uncombined(self) -> None:
        if self.dual.observed_this_step or self._warned_no_combine:
            return
        self._warned_no_combine = True
        warnings.warn(f"EUPMU(mode='implicit').step() ran without combine(): the step applied .grad as a plain "
                      f"{self.rule} update and the multiplier w took no part. Build the loss with "
                      "opt.combine(forget_loss, retain_loss) before backward().", stacklevel=5)

    def _collect(self) -> list[tuple[Bucket, list[int], list[Tensor], list[Tensor] | None]]:
        """Per bucket: indices of participating parameters, their g_f and (explicit) g_r lists.

        A parameter takes part when it has a forget (or combined) gradient or, in explicit mode,
        a retain gradient; like ``torch.optim``, one with neither is left alone entirely."""
        explicit = self.mode == "explicit"
        work = []
        for bucket in self._get_buckets():
            idx, grads_f, grads_r = [], [], []
            for i, p in enumerate(bucket.params):
                grad = p.grad
                has_retain = explicit and self.capture.has(p)
                if grad is None and not has_retain:
                    continue
                local = dist_util.local_view(p)
                if grad is None:
                    grad = torch.zeros_like(local)
                else:
                    grad = dist_util.local_view(grad)
                    check_gradient(grad, local, lambda p=p: f"gradient of {self._describe(p)}")
                idx.append(i)
                grads_f.append(grad)
                if explicit:
                    grad_r = self.capture.grad_r(bucket, i)
                    grads_r.append(torch.zeros_like(local) if grad_r is None else grad_r)
            if idx:
                work.append((bucket, idx, grads_f, grads_r if explicit else None))
        return work

    def _coefficients(self, work) -> tuple[Tensor, Tensor | None]:
        first_bucket = work[0][0]
        cfg = self.surgery_config
        inv_scale, found_inf = amp.scaler_inputs(self)
        need_gram = self.mode == "explicit" or cfg.max_norm is not None or self.skip_nonfinite
        if need_gram:
            gram = self._global_gramian(work)
        else:
            gram = torch.zeros(3, dtype=torch.float64, device=first_bucket.device)
        coef = first_bucket.backend.coefficients(gram, cfg, inv_scale, found_inf)
        return coef, (unscaled(gram, inv_scale) if need_gram else None)

    def _step_backend(self, bucket: Bucket):
        """The bucket's backend; in update space one whose kernels implement it for the bucket's device.

        With ``backend="auto"`` a bucket whose first choice lacks update-space kernels goes to the
        next one in the dispatch order that has them (Triton, then torch); a backend asked for by
        name that lacks them is an error, never a silent change of backend or of surgery space."""
        backend = bucket.backend
        if self.surgery_space != "update" or _has_update_space(backend, bucket.device):
            return backend
        if self.backend != "auto":
            others = " or ".join(f"backend={name!r}" for name in ("triton", "torch") if name != backend.name)
            raise NotImplementedError(
                f"surgery_space='update' is not implemented by backend={backend.name!r} for {bucket.device.type} "
                f"tensors; use {others} (or backend='auto'), or surgery_space='gradient'")
        for name in ("triton", "torch"):
            try:
                candidate = dispatch.get_backend(name, bucket.device, bucket.dtype)
            except dispatch.BackendUnavailableError:
                continue
            if _has_update_space(candidate, bucket.device):
                return candidate
        raise NotImplementedError(f"surgery_space='update': no backend implements it for {bucket.device.type} "
                                  f"tensors of dtype {bucket.dtype}")

    def _update_space_coefficients(self, work, launches, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """One pass per bucket gives its Gramian and update-space terms (K0, K1, K2, T0); summed over
        buckets (and shards), then the coefficients, all on the device. A Gramian the backward-pass
        hooks already formed replaces the pass's own (same values; docs/design.md, Gramian in the
        backward pass)."""
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("surgery_space='update' needs unscaled gradients: call scaler.unscale_(optimizer) "
                               "before scaler.step(optimizer)")
        parts = [self._step_backend(bucket).update_terms(self.rule, params, grads_f, grads_r, state, hp)
                 for bucket, params, grads_f, grads_r, state, hp in launches]
        terms = self._sum_over_shards(parts, [launch[0] for launch in launches])
        self.gramian_source = "step"
        if self._backward_gramian_on():
            hooked = self.backward_gramian.gramian(work, lambda p: p.grad is not None, self.capture.has)
            if hooked is not None:
                self.gramian_source = "backward"
                terms = torch.cat([sum_gramians(hooked).to(terms.device), terms[TERM_K0:]])
        budget = lr * self.surgery_config.tolerance
        first = launches[0][0]
        coef = self._step_backend(first).update_space_coefficients(terms, self.surgery_config, budget,
                                                                   getattr(self, "found_inf", None))
        return coef, terms[:TERM_K0], terms[TERM_T0]

    def _record_retain_change(self, launches, theta_r_before: Tensor, lr: float) -> None:
        """<theta_{t+1} - theta_t, g_r>, measured after the step (docs/design.md, Update-space surgery)."""
        parts = [self._step_backend(bucket).gramian(params, grads_r)[1:2]
                 for bucket, params, _, grads_r, _, _ in launches]
        theta_r_after = self._sum_over_shards(parts, [launch[0] for launch in launches])[0]
        self._stats["retain_change"] = theta_r_after - theta_r_before
        self._stats["retain_change_budget"] = torch.full_like(theta_r_after, lr * self.surgery_config.tolerance)

    def _sum_over_shards(self, parts: list[Tensor], buckets: list[Bucket]) -> Tensor:
        """Sum per-bucket float64 vectors; those of sharded buckets are all-reduced per group first."""
        local_parts: list[Tensor] = []
        sharded: dict[int, tuple[Any, list[Tensor]]] = {}
        for bucket, part in zip(buckets, parts):
            part = part.to(torch.float64)
            if bucket.reduce_group is None:
                local_parts.append(part)
            else:
                sharded.setdefault(id(bucket.reduce_group), (bucket.reduce_group, []))[1].append(part)
        for group, group_parts in sharded.values():
            local_parts.append(dist_util.all_reduce_sum_(sum_gramians(group_parts).clone(), group))
        return sum_gramians(local_parts)

    def _global_gramian(self, work) -> Tensor:
        """Sum of bucket Gramians (from the backward pass's slots when they hold, else computed
        here); partial sums of sharded buckets are all-reduced per group."""
        if self._backward_gramian_on():
            parts = self.backward_gramian.gramian(work, lambda p: p.grad is not None, self.capture.has)
            if parts is not None:
                self.gramian_source = "backward"
                return sum_gramians(parts)
        self.gramian_source = "step"
        parts = [bucket.backend.gramian(grads_f, grads_r) for bucket, _, grads_f, grads_r in work]
        return self._sum_over_shards(parts, [w[0] for w in work])

    def _rule_state(self, bucket: Bucket, params: list[Tensor]) -> RuleStateLists:
        group = self.param_groups[bucket.group_index]
        keys = self.base_rule.active_state_keys(group)
        lists = RuleStateLists()
        for p in params:
            st = self.state[p]
            if "step" not in st:
                self._init_state(p, st, keys)
            lists.step.append(st["step"])
            for key in keys:
                if key not in st:
                    raise RuntimeError(f"the optimizer state of {self._describe(p)} has no {key!r}: it was loaded "
                                       f"from a checkpoint of another rule than rule={self.rule!r}")
                getattr(lists, key).append(dist_util.local_view(st[key]))
        return lists

    def _init_state(self, p: Tensor, st: dict, keys: tuple[str, ...]) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = self.state_dtype or p.dtype
        for key in keys:
            st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _record_stats(self, gram: Tensor | None, coef: Tensor) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float32, device=coef.device)
        if self.skip_nonfinite or getattr(self, "found_inf", None) is not None:
            self._skipped.add_(coef[SKIP])
        self._stats = {"clip": coef[CLIP], "skipped": self._skipped}
        if self.mode == "explicit":
            self._stats.update({"coefficients": torch.stack([coef[A], coef[LAM]]), "lambda": coef[LAM],
                                "cos": coef[COS]})
        if gram is not None:
            self._stats["gramian"] = gram

    def stats(self) -> dict[str, Tensor]:
        """Device tensors of the last step, nothing read by the host.

        ``gramian`` (float64, of the unscaled gradients), ``clip``, ``skipped`` (non-finite steps
        so far); explicit mode adds ``lambda``, ``coefficients`` (a, b) and ``cos``; implicit mode
        ``w`` and ``dual_skipped`` (dual updates skipped for non-finite losses), and there
        ``gramian`` is (||g||^2, 0, 0) of the combined gradient."""
        out = dict(self._stats)
        if self.mode == "implicit":
            out.update(self.dual.stats())
        if "skipped" not in out and self._skipped is not None:
            out["skipped"] = self._skipped
        return out

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key, value in self.base_rule.checkpoint_keys:
                group.setdefault(key, value)
        extra: dict[str, Any] = {"mode": self.mode, "rule": self.rule}
        if self.mode == "implicit":
            extra.update(self.dual.state_dict())
        if self._skipped is not None:
            extra["skipped"] = self._skipped
        sd["eupmu"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an EUPMU state dict, or a ``torch.optim`` SGD/Adam/AdamW one of a compatible rule.

        Group keys the checkpoint lacks (e.g. ``momentum`` in an AdamW checkpoint) take this
        optimizer's defaults; a checkpoint of another mode, or whose state belongs to another base
        rule (Adam moments for ``rule="sgd"`` or the reverse), is refused with a clear error."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("eupmu", {})
        self._check_checkpoint(state_dict, extra)
        super().load_state_dict(state_dict)
        for i, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self.base_rule.check_group(group, f"param group {i} of the loaded state")
        self._restore_state_dtypes(state_dict)
        device = self._first_device()
        if self.mode == "implicit":
            self.dual.load_state_dict(extra, device)
        if "skipped" in extra:
            self._skipped = extra["skipped"].detach().clone().to(device)
        self._buckets = None
        self.capture.disarm()

    def _check_checkpoint(self, state_dict: dict[str, Any], extra: dict[str, Any]) -> None:
        saved_mode = extra.get("mode")
        if saved_mode is not None and saved_mode != self.mode:
            raise ValueError(f"this checkpoint is of an EUPMU optimizer with mode={saved_mode!r}; it cannot be "
                             f"loaded into one with mode={self.mode!r}")
        ours = set(self.base_rule.state_keys)
        for saved in state_dict.get("state", {}).values():
            keys = {k for k, v in saved.items() if isinstance(v, Tensor) and k != "step"}
            foreign = keys - ours
            if foreign:
                raise ValueError(f"the checkpoint holds optimizer state {sorted(foreign)}, which rule={self.rule!r} "
                                 f"does not use (it keeps {sorted(ours) or 'no state'}): it was saved by an "
                                 "optimizer with another base rule")

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch casts all float state to the parameter dtype; restore ours exactly instead."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            st = self.state[p]
            for key, value in saved.items():
                if not isinstance(value, Tensor):
                    if value is None:
                        st.pop(key, None)  # e.g. torch.optim.SGD's momentum_buffer=None
                    continue
                if key == "step":
                    dtype = torch.float32
                    value = value.reshape(())
                else:
                    dtype = self.state_dtype or p.dtype
                st[key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
            if "step" not in st:  # a torch.optim.SGD state has no step
                st["step"] = torch.ones((), dtype=torch.float32, device=p.device)
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            for key in self.base_rule.active_state_keys(group):
                if key not in st:  # e.g. SGD without momentum saved, momentum now > 0: start the buffer
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st[key] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype)

    def _first_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ helpers

    def _require_mode(self, mode: str, what: str) -> None:
        if self.mode != mode:
            raise RuntimeError(f"{what} is for mode={mode!r}, but this optimizer was built with mode={self.mode!r}")


def _has_update_space(backend, device: torch.device) -> bool:
    supports = getattr(backend, "supports_update_space", None)
    return supports is not None and bool(supports(device))


def _capture_mode(retain_capture: str, retain_grad_views: bool | None) -> str:
    if retain_grad_views is not None:
        return "views" if retain_grad_views else "copy"
    return "reference" if retain_capture == "auto" else retain_capture


def _dual_config(dual: str, dual_lr: float | None, w_init: float, w_max: float | None, loss_transform: str | None,
                 dual_step_scale: str | None, weighting: str, tolerance: float,
                 loss_lower_bounds: tuple[float, float]) -> DualConfig:
    if len(tuple(loss_lower_bounds)) != 2:
        raise ValueError(f"loss_lower_bounds must be a pair (m_f, m_r), got {loss_lower_bounds!r}")
    return preset(
        dual,
        lr=None if dual == "famo" else dual_lr,
        famo_lr=dual_lr if dual == "famo" else None,
        w_init=w_init,
        w_max=w_max,
        psi=loss_transform,
        phi=loss_transform,
        scale_by_lr=None if dual_step_scale is None else dual_step_scale == "lr",
        weighting=weighting,
        tolerance=tolerance,
        lower_bound_f=loss_lower_bounds[0],
        lower_bound_r=loss_lower_bounds[1],
    )
