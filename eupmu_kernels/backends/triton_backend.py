"""The Triton backend: the kernel contract as Triton kernels, one launch per group and pass.

Each call turns its tensor lists into a cached device table of addresses (``eupmu_kernels.triton
.tables``) and launches the kernels of ``eupmu_kernels.triton`` over all tensors of the group at
once. Math is float32 for float32/float16/bfloat16 storage; optimizer state may be stored in a
wider dtype than the parameters.

The kernels treat every tensor as its ``numel`` consecutive elements, so tensors must be dense
and the tensors of one parameter (param, gradients, state) must share shape and strides; this is
checked on every call and reported with the offending list and index.

The Gramian is float64[3] (products and sums in float64, so any finite gradient has a finite,
accurate Gramian); the coefficient stage reads float64 (or float32) and computes in float64.

Runs on CUDA tensors, or on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``eupmu_kernels`` is imported; slow, for tests).
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from types import ModuleType
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..validation import is_dense
from ..contract import COEF_LEN, RuleStateLists, StepHyper, SurgeryConfig
from ..rules import RULES as _RULE_UNITS

RULES = tuple(_RULE_UNITS)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=None)
def _kernels() -> ModuleType | None:
    """The kernel package, or None when triton (or a kernel definition) cannot be imported here."""
    try:
        from .. import triton as kernels
    except Exception:  # a broken or too old triton install raises more than ImportError
        return None
    return kernels


def _loaded_kernels() -> ModuleType:
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("triton backend: the triton package (or its kernels) cannot be imported")
    return kernels


class TritonBackend:
    name = "triton"

    def available(self) -> bool:
        return _kernels() is not None

    def supports_update_space(self, device: torch.device) -> bool:
        """update_terms, update_space_coefficients and the uncorrected-preconditioner Adam step."""
        return True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        kernels = _kernels()
        if dtype not in SUPPORTED_DTYPES or kernels is None:
            return False
        interpreted = kernels.INTERPRETED
        if device.type == "cpu":
            return interpreted and os.environ.get("TRITON_INTERPRET") == "1"
        if device.type == "cuda":
            return not interpreted and torch.cuda.is_available()
        return False

    # ------------------------------------------------------------------ contract

    def gramian(self, a: Sequence[Tensor], b: Sequence[Tensor] | None) -> Tensor:
        b = None if b is None else list(b)
        device, dtype, roles = _checked_roles(list(a), b, "a", "b")
        kernels = _loaded_kernels()
        table = kernels.tables.tensor_table(device, roles)
        with _on_device(device):
            return kernels.gramian.gramian(table, dtype, b is not None, device)

    def coefficients(self, gram: Tensor, cfg: SurgeryConfig, inv_scale: Tensor | None,
                     found_inf: Tensor | None) -> Tensor:
        if gram.numel() != 3:
            raise ValueError(f"gram must have 3 elements, got shape {tuple(gram.shape)}")
        with _on_device(gram.device):
            return _loaded_kernels().coefficients.coefficients(gram, cfg, inv_scale, found_inf)

    def combine_(self, grads_f: Sequence[Tensor], grads_r: Sequence[Tensor] | None, coef: Tensor) -> None:
        grads_f = list(grads_f)
        if not grads_f:
            return
        grads_r = None if grads_r is None else list(grads_r)
        device, dtype, roles = _checked_roles(grads_f, grads_r, "grads_f", "grads_r")
        kernels = _loaded_kernels()
        update = kernels.update
        launch = update.Launch(table=kernels.tables.tensor_table(device, roles),
                               roles=update.Roles(param=0, grad_f=0, grad_r=None if grads_r is None else 1),
                               param_dtype=dtype, state_dtype=dtype, coef=_coef_on(coef, device))
        with _on_device(device):
            update.combine(launch)

    def step_(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
              grads_r: Sequence[Tensor] | None, state: RuleStateLists, coef: Tensor, hp: StepHyper) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        params = list(params)
        if not params:
            return
        device, dtype = _group_of(params, "params")
        _check_dense(params, "params")
        roles, rows, state_dtype = _step_roles(rule, params, list(grads_f), grads_r, state, hp, device, dtype)
        _check_steps(state.step, len(params), device)

        kernels = _loaded_kernels()
        update = kernels.update
        table = kernels.tables.tensor_table(device, roles, scalars=state.step)
        launch = update.Launch(table=table, roles=update.Roles(param=0, **rows), param_dtype=dtype,
                               state_dtype=state_dtype, coef=_coef_on(coef, device))
        with _on_device(device):
            if rule == "sgd":
                update.sgd_step(launch, hp.lr, hp.weight_decay, hp.momentum, hp.dampening, hp.nesterov)
            else:
                update.adam_step(launch, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay,
                                 decoupled=rule == "adamw", uncorrected=hp.uncorrected_preconditioner)

    def update_terms(self, rule: str, params: Sequence[Tensor], grads_f: Sequence[Tensor],
                     grads_r: Sequence[Tensor], state: RuleStateLists, hp: StepHyper) -> Tensor:
        """The Gramian and update-space terms in one reduction over the step's own table (cached:
        the update launch that follows finds it built)."""
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        params = list(params)
        if not params:
            raise ValueError("params is empty")
        device, dtype = _group_of(params, "params")
        _check_dense(params, "params")
        roles, rows, state_dtype = _step_roles(rule, params, list(grads_f), list(grads_r), state, hp, device, dtype)
        _check_steps(state.step, len(params), device)
        kernels = _loaded_kernels()
        table = kernels.tables.tensor_table(device, roles, scalars=state.step)
        # an absent state role reads the parameters' row (never loaded: the kernel is specialised)
        addresses = tuple(table.role(rows.get(role, 0)) for role in ("param", "grad_f", "grad_r", "state1", "state2"))
        with _on_device(device):
            return kernels.update_space.terms(table, addresses, dtype, state_dtype, rule, "state1" in rows, hp,
                                              device)

    def update_space_coefficients(self, terms: Tensor, cfg: SurgeryConfig, budget: float,
                                  found_inf: Tensor | None) -> Tensor:
        with _on_device(terms.device):
            return _loaded_kernels().update_space.coefficients(terms, cfg, budget, found_inf)


# ---------------------------------------------------------------------- checks and helpers


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _checked_roles(first: list[Tensor], second: list[Tensor] | None, first_name: str,
                   second_name: str) -> tuple[torch.device, torch.dtype, list[list[Tensor]]]:
    """Validate a list and its optional partner list; return the group and the table roles."""
    device, dtype = _group_of(first, first_name)
    _check_dense(first, first_name)
    if second is None:
        return device, dtype, [first]
    _check_partners(second, first, second_name, first_name, device, dtype)
    return device, dtype, [first, second]


def _group_of(tensors: list[Tensor], what: str) -> tuple[torch.device, torch.dtype]:
    if not tensors:
        raise ValueError(f"{what} is empty")
    device, dtype = tensors[0].device, tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: {what}[0] has dtype {dtype}; supported: {SUPPORTED_DTYPES}")
    for i, t in enumerate(tensors):
        if t.device != device or t.dtype != dtype:
            raise ValueError(f"triton backend: {what}[{i}] is a {t.dtype} tensor on {t.device}, but the group "
                             f"is {dtype} on {device}; a group shares one device and dtype")
    return device, dtype


def _check_dense(tensors: list[Tensor], what: str) -> None:
    for i, t in enumerate(tensors):
        if not (t.is_contiguous() or is_dense(t)):
            raise ValueError(f"triton backend: {what}[{i}] is not dense (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}); the kernels need tensors that cover consecutive memory")


def _same_layout(x: Tensor, ref: Tensor) -> bool:
    """Element k of x's memory is element k of ref's memory (both dense)."""
    if x.numel() != ref.numel():
        return False
    if x.is_contiguous() and ref.is_contiguous():
        return True
    return x.shape == ref.shape and x.stride() == ref.stride()


def _check_partners(tensors: list[Tensor], ref: list[Tensor], what: str, ref_what: str, device: torch.device,
                    dtype: torch.dtype) -> None:
    """``tensors[i]`` pairs element-wise with ``ref[i]``: same device, the given dtype, same layout."""
    if len(tensors) != len(ref):
        raise ValueError(f"triton backend: {what} has {len(tensors)} tensors but {ref_what} has {len(ref)}")
    for i, (t, r) in enumerate(zip(tensors, ref)):
        if t.device != device or t.dtype != dtype:
            raise ValueError(f"triton backend: {what}[{i}] is a {t.dtype} tensor on {t.device}; "
                             f"expected {dtype} on {device}")
        if not _same_layout(t, r):
            raise ValueError(f"triton backend: {what}[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) is not "
                             f"laid out like {ref_what}[{i}] (shape {tuple(r.shape)}, strides {r.stride()}); "
                             "all tensors of one parameter must share shape and strides")


def _step_roles(rule: str, params: list[Tensor], grads_f: list[Tensor], grads_r: Sequence[Tensor] | None,
                state: RuleStateLists, hp: StepHyper, device: torch.device,
                dtype: torch.dtype) -> tuple[list[list[Tensor]], dict[str, int], torch.dtype]:
    """The checked tensor lists of one step (params first), the row of each role, the state dtype."""
    roles, rows = [params], {"grad_f": 1}
    _check_partners(grads_f, params, "grads_f", "params", device, dtype)
    roles.append(grads_f)
    if grads_r is not None:
        grads_r = list(grads_r)
        _check_partners(grads_r, params, "grads_r", "params", device, dtype)
        rows["grad_r"] = len(roles)
        roles.append(grads_r)
    states = _rule_states(rule, state, hp)
    state_dtype = _state_dtype(states, dtype)
    for i, (key, tensors) in enumerate(states):
        _check_partners(tensors, params, key, "params", device, state_dtype)
        rows[f"state{i + 1}"] = len(roles)
        roles.append(tensors)
    return roles, rows, state_dtype


def _rule_states(rule: str, state: RuleStateLists, hp: StepHyper) -> list[tuple[str, list[Tensor]]]:
    if rule == "sgd":
        return [("momentum_buffer", list(state.momentum_buffer))] if hp.momentum != 0 else []
    return [("exp_avg", list(state.exp_avg)), ("exp_avg_sq", list(state.exp_avg_sq))]


def _state_dtype(states: list[tuple[str, list[Tensor]]], param_dtype: torch.dtype) -> torch.dtype:
    if not states or not states[0][1]:
        return param_dtype
    dtype = states[0][1][0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: optimizer state has dtype {dtype}; supported: {SUPPORTED_DTYPES}")
    return dtype


def _check_steps(steps: list[Tensor], count: int, device: torch.device) -> None:
    if len(steps) != count:
        raise ValueError(f"triton backend: state.step has {len(steps)} tensors but params has {count}")
    for i, s in enumerate(steps):
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            raise ValueError(f"triton backend: state.step[{i}] must be a one-element float32 tensor on {device}, "
                             f"got {s.dtype} with {s.numel()} elements on {s.device}")


def _coef_on(coef: Tensor, device: torch.device) -> Tensor:
    if coef.numel() != COEF_LEN:
        raise ValueError(f"coef must have {COEF_LEN} elements, got shape {tuple(coef.shape)}")
    return _loaded_kernels().common.aligned(coef.to(device=device, dtype=torch.float32).contiguous())
