"""The ``native`` backend: the compiled extension ``eupmu_kernels._C``.

CPU tensors run fused C++ loops on ATen's intra-op threads (always compiled in); CUDA tensors run
the CUDA kernels (multi-tensor launches over 64k-element chunks) when the extension was built with
them (``has_cuda_kernels()``). Both implement the kernel contract (:mod:`eupmu_kernels.contract`)
for float32, bfloat16 and float16 storage with float32 math.

The extension handles every parameter whose optimizer state shares the parameter's dense layout
and is float32 or of the parameter's dtype; it hands any other parameter back, and those few go
through the torch backend (same semantics, also free of host synchronisation).
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Sequence

import torch
from torch import Tensor

from ..reductions import sum_rows
from ..contract import RuleStateLists, StepHyper, SurgeryConfig, rule_codes, surgery_codes
from .torch_backend import TorchBackend

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METHOD_CODE = surgery_codes()
RULE_CODE = rule_codes()


@lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """The compiled module, or None when it was not built (or does not load here)."""
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def extension_error() -> str | None:
    """Why the extension does not import (None when it does)."""
    try:
        from .. import _C  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _ext() -> ModuleType:
    ext = load_extension()
    if ext is None:
        raise RuntimeError("eupmu_kernels._C is not built; reinstall with EUPMU_BUILD_EXT=1")
    return ext


def _subset(tensors: Sequence[Tensor], idx: Sequence[int]) -> list[Tensor]:
    return [tensors[i] for i in idx] if tensors else []


class NativeBackend:
    name = "native"

    def __init__(self) -> None:
        self._fallback = TorchBackend()

    def available(self) -> bool:
        return load_extension() is not None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        ext = load_extension()
        if ext is None or dtype not in KERNEL_DTYPES:
            return False
        if device.type == "cuda":
            return bool(ext.has_cuda_kernels()) and torch.cuda.is_available()
        return device.type == "cpu"

    def supports_update_space(self, device: torch.device) -> bool:
        """Update-space surgery (docs/design.md): C++ CPU kernels, and CUDA kernels where built."""
        ext = load_extension()
        return ext is not None and (device.type == "cpu" or bool(ext.has_cuda_kernels()))

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        # Per-tensor float64 totals, then the fixed-order column sum of eupmu_kernels.reductions:
        # the order in which the post-accumulate-grad hooks' slots are summed, so the Gramian is
        # bit-identical whether the hooks or the step formed it (docs/design.md, Kernel contract).
        # One tensor is its own total (the hooks' case): no sum to form.
        a, b = list(a), None if b is None else list(b)
        if len(a) == 1:
            return _ext().gramian(a, b)
        return sum_rows(_ext().gramian(a, b, per_tensor=True))

    def coefficients(self, gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None,
                     found_inf: Tensor | None) -> Tensor:
        return _ext().coefficients(gram, METHOD_CODE[cfg.method], cfg.eps, cfg.alpha, cfg.max_norm,
                                   inv_scale, found_inf)

    def combine_(self, grads_f: Sequence[Tensor], grads_r: Sequence[Tensor] | None, coef: Tensor) -> None:
        _ext().combine_(list(grads_f), None if grads_r is None else list(grads_r), coef)

    def step_(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
              grads_r: Sequence[Tensor] | None, state: RuleStateLists, coef: Tensor, hp: StepHyper) -> None:
        params, grads_f = list(params), list(grads_f)
        grads_r = None if grads_r is None else list(grads_r)
        left = _ext().step_(RULE_CODE[rule], params, grads_f, grads_r, list(state.step), list(state.exp_avg),
                            list(state.exp_avg_sq), list(state.momentum_buffer), coef, hp.lr, hp.beta1,
                            hp.beta2, hp.eps, hp.weight_decay, hp.momentum, hp.dampening, hp.nesterov,
                            hp.uncorrected_preconditioner)
        if left:
            self._step_with_torch(rule, params, grads_f, grads_r, state, coef, hp, left)

    def update_terms(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
                     grads_r: Sequence[Tensor], state: RuleStateLists, hp: StepHyper) -> Tensor:
        """The Gramian and update-space terms in one pass of the C++ kernels (parameters they hand
        back go through the torch backend, like in step_)."""
        params, grads_f, grads_r = list(params), list(grads_f), list(grads_r)
        terms, left = _ext().update_terms(RULE_CODE[rule], params, grads_f, grads_r, list(state.step),
                                          list(state.exp_avg), list(state.exp_avg_sq), list(state.momentum_buffer),
                                          hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.momentum,
                                          hp.dampening, hp.nesterov)
        if left:
            rest = self._fallback.update_terms(rule, _subset(params, left), _subset(grads_f, left),
                                               _subset(grads_r, left), _sub_state(state, left), hp)
            terms = sum_rows(torch.stack([terms, rest.to(terms.device)]))
        return terms

    def update_space_coefficients(self, terms: Tensor, cfg: SurgeryConfig, budget: float,
                                  found_inf: Tensor | None) -> Tensor:
        return _ext().update_space_coefficients(terms, budget, cfg.max_norm, found_inf)

    def _step_with_torch(self, rule: str, params: list[Tensor], grads_f: list[Tensor], grads_r: list[Tensor] | None,
                         state: RuleStateLists, coef: Tensor, hp: StepHyper, idx: Sequence[int]) -> None:
        self._fallback.step_(rule, _subset(params, idx), _subset(grads_f, idx),
                             None if grads_r is None else _subset(grads_r, idx), _sub_state(state, idx), coef, hp)


def _sub_state(state: RuleStateLists, idx: Sequence[int]) -> RuleStateLists:
    return RuleStateLists(step=_subset(state.step, idx), exp_avg=_subset(state.exp_avg, idx),
                          exp_avg_sq=_subset(state.exp_avg_sq, idx),
                          momentum_buffer=_subset(state.momentum_buffer, idx))

