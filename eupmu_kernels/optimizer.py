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

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from . import dispatch
from . import distributed as dist_util
from .backends.base import CA, CB, CLIP, COS, LAM, RULES, SKIP, A, RuleStateLists, StepHyper
from .buckets import DEFAULT_BUCKET_NUMEL, Bucket, build_buckets
from .dual import DualConfig, LossWeighting, preset
from .ops import make_config, sum_gramians
from .validation import check_gradient

MODES = ("implicit", "explicit")
_ADAM_STATE = ("exp_avg", "exp_avg_sq")


class EUPMU(torch.optim.Optimizer):
    """Unlearning optimizer: gradient surgery (explicit) or implicit surgery (one backward pass).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer; an iterable of
            ``(name, parameter)`` pairs (``model.named_parameters()``) makes errors name them.
        lr, betas, eps, weight_decay, momentum, dampening, nesterov: the base rule's
            hyperparameters, per group, with ``torch.optim`` meanings and defaults
            (``weight_decay`` defaults to 1e-2 for adamw and 0 otherwise).
        rule: base update rule, ``"adamw"``, ``"adam"`` or ``"sgd"``.
        mode: ``"implicit"`` (one backward pass through :meth:`combine`) or ``"explicit"``.
        surgery: explicit-mode rule, ``"ungrad"`` (unilateral, default), ``"pcgrad"``, ``"graddiff"``.
        tolerance: epsilon, the tolerated first-order retain-loss increase per unit step.
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
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; default: the
            ``EUPMU_BACKEND`` environment variable, else auto.
        bucket_numel: maximal elements per bucket of the retain-gradient buffer.
        retain_grad_views: in explicit mode, :meth:`zero_grad` points each ``.grad`` at its view
            of the retain buffer, so the retain backward pass writes g_r there with no copy
            (plain tensors only; DTensor gradients are copied at :meth:`stash_retain_grad`).
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
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        surgery: str = "ungrad",
        tolerance: float = 0.0,
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
        retain_grad_views: bool = True,
        process_group: Any = None,
        data_parallel_group: Any = "auto",
        grad_scaler: Any = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if surgery not in ("ungrad", "pcgrad", "graddiff"):
            raise ValueError(f"surgery must be 'ungrad', 'pcgrad' or 'graddiff', got {surgery!r}")
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if mode == "explicit" and tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 in explicit mode, got {tolerance}")
        if weight_decay is None:
            weight_decay = 1e-2 if rule == "adamw" else 0.0
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        if dual_step_scale not in (None, "lr", "one"):
            raise ValueError(f"dual_step_scale must be 'lr' or 'one', got {dual_step_scale!r}")

        params, self._param_names = _split_names(params)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults)

        self.rule = rule
        self.mode = mode
        self.surgery_config = make_config(surgery if mode == "explicit" else "none",
                                          tolerance if mode == "explicit" else 0.0, alpha, max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.state_dtype = state_dtype
        self.backend = dispatch.requested_backend(backend)
        self.bucket_numel = bucket_numel
        self.retain_grad_views = retain_grad_views and mode == "explicit"
        self.process_group = process_group
        self.data_parallel_group = dist_util.resolve_data_parallel_group(data_parallel_group)
        self.grad_scaler = grad_scaler
        self.dual_config: DualConfig = preset(
            dual,
            lr=dual_lr if dual_lr is not None else (0.025 if dual == "famo" else None),
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
        self.weighting = LossWeighting(self.dual_config)

        self._buckets: list[Bucket] | None = None
        self._retain_captured = False  # a retain gradient was stashed since the last step
        self._retain_present: dict[int, bool] = {}
        self._armed = False  # .grad tensors currently point at the retain views
        self._losses: tuple[Tensor, Tensor] | None = None  # mean (L_f, L_r) at theta_t of the last step
        self._loss_sum: Tensor | None = None  # (L_f, L_r) summed over this step's micro-batches
        self._loss_count = 0
        self._pending_lr: float | None = None  # set by step(), consumed by the dual update
        self._stats: dict[str, Tensor] = {}
        self._skipped: Tensor | None = None

    # ------------------------------------------------------------------ param groups, buckets

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        params, names = _split_names(params)
        if hasattr(self, "_param_names"):
            self._param_names.update(names)
        super().add_param_group({**param_group, "params": params})
        if getattr(self, "_buckets", None) is not None:
            self._disarm()
            self._buckets = None

    def _get_buckets(self) -> list[Bucket]:
        if self._buckets is None:
            self._buckets = build_buckets(self.param_groups, self._param_names, self.bucket_numel,
                                          lambda p: dist_util.shard_group(p, self.process_group))
        return self._buckets

    def _name(self, p: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return self._param_names.get(id(p), f"group {gi} param #{pi}")
        return "<unknown parameter>"

    # ------------------------------------------------------------------ retain gradient capture

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the forget/combined gradients (``.grad``) and the retain buffer.

        In explicit mode with ``retain_grad_views`` (default) each ``.grad`` is then pointed at
        its zeroed view of the retain buffer, so the next backward pass (the retain loss) is
        captured without a copy; :meth:`stash_retain_grad` then detaches it.
        """
        super().zero_grad(set_to_none=set_to_none)
        self._retain_captured = False
        self._retain_present = {}
        self._armed = False
        if self.mode != "explicit":
            return
        for bucket in self._get_buckets():
            if bucket.retain is not None:
                bucket.retain.zero_()
        if self.retain_grad_views:
            self._arm()

    def _arm(self) -> None:
        for bucket in self._get_buckets():
            bucket.ensure_retain_buffer()
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.requires_grad and p.grad is None and not dist_util.is_dtensor(p):
                    p.grad = view
        self._armed = True

    def _disarm(self) -> None:
        if not self._armed or self._buckets is None:
            return
        for bucket in self._buckets:
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.grad is view:
                    p.grad = None
        self._armed = False

    def stash_retain_grad(self) -> None:
        """Take the current ``.grad`` as (a further micro-batch of) the retain gradient.

        The retain buffer accumulates across calls until the next :meth:`step` or
        :meth:`zero_grad`; ``.grad`` is cleared so the forget backward pass starts from zero.
        Call it after all retain backward passes and before any forget backward pass (use
        :meth:`retain_grad` to interleave micro-batches).
        """
        self._require_mode("explicit", "stash_retain_grad()")
        first = not self._retain_captured
        for bucket in self._get_buckets():
            bucket.ensure_retain_buffer()
            for p, view in zip(bucket.params, bucket.retain_views):
                grad = p.grad
                if grad is view:  # armed: the backward pass already wrote into the buffer
                    self._retain_present[id(p)] = True
                elif grad is not None:
                    grad = dist_util.local_view(grad)
                    check_gradient(grad, dist_util.local_view(p),
                                   lambda p=p: f"retain gradient of parameter {self._name(p)!r}")
                    if first and not self._armed:
                        view.copy_(grad)
                    else:
                        view.add_(grad)
                    self._retain_present[id(p)] = True
                elif first and not self._armed:
                    view.zero_()
                p.grad = None
        self._armed = False
        self._retain_captured = True

    @contextlib.contextmanager
    def retain_grad(self) -> Iterator[None]:
        """Within the block, backward passes accumulate into the retain buffer (no copy).

        ``.grad`` (the forget gradient accumulated so far) is set aside on entry and restored on
        exit, so retain and forget micro-batches may be interleaved freely.
        """
        self._require_mode("explicit", "retain_grad()")
        if self._armed:
            self._disarm()
        held: dict[int, Tensor | None] = {}
        fresh = not self._retain_captured
        for bucket in self._get_buckets():
            bucket.ensure_retain_buffer()
            if fresh:
                bucket.retain.zero_()
            for p, view in zip(bucket.params, bucket.retain_views):
                held[id(p)] = p.grad
                p.grad = view if p.requires_grad and not dist_util.is_dtensor(p) else None
        self._retain_captured = True
        try:
            yield
        finally:
            for bucket in self._get_buckets():
                for p, view in zip(bucket.params, bucket.retain_views):
                    if dist_util.is_dtensor(p) and p.grad is not None:  # sharded grads arrive as new tensors
                        view.add_(dist_util.local_view(p.grad))
                    self._retain_present[id(p)] = self._retain_present.get(id(p), False) or p.requires_grad
                    p.grad = held.get(id(p))

    # ------------------------------------------------------------------ implicit mode

    def combine(self, forget_loss: Tensor, retain_loss: Tensor) -> Tensor:
        """The one-backward objective J = psi(L_f) + w psi(L_r) (or FAMO's), with w on the device.

        If the previous step's dual update is still pending, ``retain_loss`` (evaluated at the
        new parameters) serves as the lagged L_r(theta_{t+1}) for it first.
        """
        self._require_mode("implicit", "combine()")
        if forget_loss.dim() != 0 or retain_loss.dim() != 0:
            raise ValueError("combine() expects scalar losses")
        if self._pending_lr is not None and self._losses is not None:
            self._dual_step(retain_loss, forget_loss)
        observed = torch.stack([forget_loss.detach(), retain_loss.detach()]).float()
        self._loss_sum = observed if self._loss_count == 0 else self._loss_sum + observed
        self._loss_count += 1
        return self.weighting.objective(forget_loss, retain_loss)

    def update_dual(self, retain_loss_after: Tensor, forget_loss_after: Tensor | None = None) -> None:
        """Exact dual update from L_r(theta_{t+1}) on the same retain batch (no-grad forward)."""
        self._require_mode("implicit", "update_dual()")
        if self._pending_lr is None or self._losses is None:
            raise RuntimeError("update_dual() must follow combine() and step()")
        self._dual_step(retain_loss_after, forget_loss_after)

    def _dual_step(self, retain_after: Tensor, forget_after: Tensor | None) -> None:
        assert self._losses is not None and self._pending_lr is not None
        after = [retain_after] if forget_after is None else [retain_after, forget_after]
        observed = torch.cat([torch.stack(self._losses).float(),
                              torch.stack([t.detach().float().reshape(()) for t in after])])
        f0, r0, r1, *f1 = dist_util.mean_over_ranks(observed, self.data_parallel_group)  # one collective
        self.weighting.update((f0, r0), (f1[0] if f1 else None, r1), self._pending_lr)
        self._pending_lr = None

    @property
    def w(self) -> Tensor | None:
        """The multiplier w (device tensor), or None before the first combine()."""
        return None if self.weighting.state is None else self.weighting.state.w

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.mode == "explicit" and not self._retain_captured:
            raise RuntimeError("EUPMU(mode='explicit').step() needs a retain gradient: call "
                               "retain_loss.backward(); opt.stash_retain_grad() before forget_loss.backward()")
        work = self._collect()
        if not work:
            return loss
        self._unscale_retain_after_prior_unscale()
        coef, gram = self._coefficients(work)
        for bucket, idx, grads_f, grads_r in work:
            backend = dispatch.get_backend(self.backend, bucket.device, bucket.dtype)
            params = [bucket.params[i] for i in idx]
            state, hp = self._rule_state(bucket, params)
            params = [dist_util.local_view(p) for p in params]
            backend.step_(self.rule, params, grads_f, grads_r, state, coef.to(bucket.device, non_blocking=True), hp)
        self._record_stats(gram, coef)
        self._report_overflow_to_scaler(coef)
        self._retain_captured = False
        self._retain_present = {}
        if self.mode == "implicit" and self._loss_count > 0:
            self._losses = tuple(self._loss_sum / self._loss_count)  # type: ignore[assignment]
            self._loss_count = 0
            self._pending_lr = float(self.param_groups[0]["lr"])
        return loss

    def _unscale_retain_after_prior_unscale(self) -> None:
        """GradScaler with a prior ``scaler.unscale_(opt)``: g_f is unscaled, g_r not yet."""
        if self.mode != "explicit" or getattr(self, "found_inf", None) is None:
            return
        if getattr(self, "grad_scale", None) is not None:
            return  # both gradients are still scaled: the coefficients unscale them together
        if self.grad_scaler is None:
            raise RuntimeError("scaler.unscale_(optimizer) unscaled only .grad (the forget gradient); pass "
                               "grad_scaler=scaler to EUPMU so the stashed retain gradient is unscaled too")
        inv_scale = _inverse(self.grad_scaler._scale)
        for bucket in self._get_buckets():
            if bucket.retain is not None:
                bucket.retain.mul_(inv_scale.to(bucket.device))

    def _report_overflow_to_scaler(self, coef: Tensor) -> None:
        """Let a non-finite retain gradient back off the GradScaler's scale (it only checks .grad)."""
        if self.grad_scaler is None or getattr(self, "found_inf", None) is None:
            return
        per_device = self.grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        for flag in per_device.values():
            flag.copy_(torch.maximum(flag, coef[SKIP].to(device=flag.device, dtype=flag.dtype)))

    def _collect(self) -> list[tuple[Bucket, list[int], list[Tensor], list[Tensor] | None]]:
        """Per bucket: indices of participating parameters, their g_f and (explicit) g_r lists."""
        explicit = self.mode == "explicit"
        work = []
        for bucket in self._get_buckets():
            idx, grads_f, grads_r = [], [], []
            for i, p in enumerate(bucket.params):
                grad = p.grad
                has_retain = explicit and self._retain_present.get(id(p), False)
                if grad is None and not has_retain:
                    continue
                local = dist_util.local_view(p)
                if grad is None:
                    grad = torch.zeros_like(local)
                else:
                    grad = dist_util.local_view(grad)
                    check_gradient(grad, local, lambda p=p: f"gradient of parameter {self._name(p)!r}")
                idx.append(i)
                grads_f.append(grad)
                if explicit:
                    grads_r.append(bucket.retain_views[i])
            if idx:
                work.append((bucket, idx, grads_f, grads_r if explicit else None))
        return work

    def _coefficients(self, work) -> tuple[Tensor, Tensor | None]:
        first_bucket = work[0][0]
        backend = dispatch.get_backend(self.backend, first_bucket.device, first_bucket.dtype)
        cfg = self.surgery_config
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else _inverse(grad_scale)
        need_gram = self.mode == "explicit" or cfg.max_norm is not None or self.skip_nonfinite
        if need_gram:
            gram = self._global_gramian(work)
        else:
            gram = torch.zeros(3, dtype=torch.float32, device=first_bucket.device)
        return backend.coefficients(gram, cfg, inv_scale, found_inf), (gram if need_gram else None)

    def _global_gramian(self, work) -> Tensor:
        """Sum of bucket Gramians; partial sums of sharded buckets are all-reduced per group."""
        local_parts: list[Tensor] = []
        sharded: dict[int, tuple[Any, list[Tensor]]] = {}
        for bucket, _, grads_f, grads_r in work:
            part = dispatch.get_backend(self.backend, bucket.device, bucket.dtype).gramian(grads_f, grads_r)
            if bucket.reduce_group is None:
                local_parts.append(part)
            else:
                sharded.setdefault(id(bucket.reduce_group), (bucket.reduce_group, []))[1].append(part)
        for group, parts in sharded.values():
            local_parts.append(dist_util.all_reduce_sum_(sum_gramians(parts).clone(), group))
        return sum_gramians(local_parts)

    def _rule_state(self, bucket: Bucket, params: list[Tensor]) -> tuple[RuleStateLists, StepHyper]:
        group = self.param_groups[bucket.group_index]
        lists = RuleStateLists()
        local = dist_util.local_view
        for p in params:
            st = self.state[p]
            if "step" not in st:
                self._init_state(p, st, group)
            lists.step.append(st["step"])
            if self.rule == "sgd":
                if group["momentum"] != 0:
                    lists.momentum_buffer.append(local(st["momentum_buffer"]))
            else:
                lists.exp_avg.append(local(st["exp_avg"]))
                lists.exp_avg_sq.append(local(st["exp_avg_sq"]))
        lr = group["lr"]
        if isinstance(lr, Tensor):
            raise TypeError("EUPMU takes a float learning rate; a Tensor lr is not supported")
        hp = StepHyper(lr=float(lr), beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                       weight_decay=group["weight_decay"], momentum=group["momentum"],
                       dampening=group["dampening"], nesterov=group["nesterov"])
        return lists, hp

    def _init_state(self, p: Tensor, st: dict, group: dict) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = self.state_dtype or p.dtype
        if self.rule == "sgd":
            if group["momentum"] != 0:
                st["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        else:
            for key in _ADAM_STATE:
                st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _record_stats(self, gram: Tensor | None, coef: Tensor) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float32, device=coef.device)
        if self.skip_nonfinite or getattr(self, "found_inf", None) is not None:
            self._skipped.add_(coef[SKIP])
        self._stats = {"clip": coef[CLIP], "skipped": self._skipped}
        if self.mode == "explicit":
            self._stats.update({"coefficients": torch.stack([coef[A], coef[LAM]]), "lambda": coef[LAM],
                                "cos": coef[COS], "direction_scale": torch.stack([coef[CA], coef[CB]])})
        if gram is not None:
            self._stats["gramian"] = gram

    def stats(self) -> dict[str, Tensor]:
        """Device tensors of the last step: ``gramian``, ``clip``, ``skipped`` (non-finite steps so
        far); explicit mode adds ``lambda``, ``coefficients`` (a, b), ``cos``; implicit mode ``w``.
        In implicit mode ``gramian`` is (||g||^2, 0, 0) of the combined gradient."""
        out = dict(self._stats)
        if self.w is not None:
            out["w"] = self.w
        if "skipped" not in out and self._skipped is not None:
            out["skipped"] = self._skipped
        return out

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra: dict[str, Any] = {"pending_lr": self._pending_lr}
        if self.weighting.state is not None:
            extra["dual"] = self.weighting.state.to_dict()
        if self._losses is not None:
            extra["losses"] = self._losses
        if self._skipped is not None:
            extra["skipped"] = self._skipped
        sd["eupmu"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("eupmu", {})
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        self._pending_lr = extra.get("pending_lr")
        device = self._first_device()
        if "dual" in extra:
            self.weighting.ensure_state(device).load(extra["dual"])
        if "losses" in extra:
            self._losses = tuple(t.detach().clone().to(device) for t in extra["losses"])  # type: ignore
        if "skipped" in extra:
            self._skipped = extra["skipped"].detach().clone().to(device)

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch casts all float state to the parameter dtype; restore ours exactly instead."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            for key, value in saved.items():
                if not isinstance(value, Tensor):
                    continue
                if key == "step":
                    dtype = torch.float32
                    value = value.reshape(())
                else:
                    dtype = self.state_dtype or p.dtype
                self.state[p][key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
            if "step" not in self.state[p]:  # a torch.optim.SGD state has no step
                self.state[p]["step"] = torch.ones((), dtype=torch.float32, device=p.device)

    def _first_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ helpers

    def _require_mode(self, mode: str, what: str) -> None:
        if self.mode != mode:
            raise RuntimeError(f"{what} is for mode={mode!r}, but this optimizer was built with mode={self.mode!r}")


def _inverse(scale: Tensor) -> Tensor:
    """1/scale in float32, computed in float64 so a power-of-two scale inverts exactly."""
    return scale.double().reciprocal().float()


def _split_names(params: Iterable) -> tuple[list, dict[int, str]]:
    """Accept parameters, param-group dicts, or (name, parameter) pairs; collect names by id."""
    params = list(params)
    names: dict[int, str] = {}
    if params and isinstance(params[0], tuple):
        for name, p in params:
            names[id(p)] = name
        return [p for _, p in params], names
    out = []
    for entry in params:
        if isinstance(entry, dict) and entry.get("params") is not None:
            ps = entry["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            if ps and isinstance(ps[0], tuple):
                names.update({id(p): n for n, p in ps})
                ps = [p for _, p in ps]
            entry = {**entry, "params": ps}
        out.append(entry)
    return out, names
