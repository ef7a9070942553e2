"""Kernel micro-benchmarks with pytest-benchmark: each kernel of the contract, per backend.

Not part of the default test run (its name does not start with ``test_``). Run with

    python -m pytest benchmarks/bench_kernels.py

Environment: ``EUPMU_BENCH_NUMEL`` (default 4e6 parameters), ``EUPMU_BENCH_MODEL`` (gpt2 or
llama tensor layout), ``EUPMU_BENCH_DTYPES`` (default "float32,bfloat16"). The device is CUDA
when available, else CPU; on CUDA every timed call ends with a device synchronisation, since
pytest-benchmark reads the host clock. Triton on CPU runs only when ``TRITON_INTERPRET=1`` is
set (and then times the interpreter, not a kernel).
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from typing import Callable

import pytest
import torch
from eupmu_bench.runner import BACKEND_NAMES, dtype_name, usable_backends
from eupmu_bench.workloads import Workload, make_workload

from eupmu_kernels import dispatch
from eupmu_kernels.contract import KernelBackend, RuleStateLists, StepHyper, SurgeryConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUMEL = int(float(os.environ.get("EUPMU_BENCH_NUMEL", "4e6")))
MODEL = os.environ.get("EUPMU_BENCH_MODEL", "gpt2")
DTYPES = [getattr(torch, name.strip()) for name in os.environ.get("EUPMU_BENCH_DTYPES", "float32,bfloat16").split(",")]
HYPER = StepHyper(lr=1e-3, weight_decay=1e-2)
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _backend_params() -> list:
    params = []
    for dtype in DTYPES:
        usable, skipped = usable_backends(BACKEND_NAMES, DEVICE, dtype, allow_interpreter=INTERPRETER)
        params += [pytest.param(name, dtype, id=f"{name}-{dtype_name(dtype)}") for name in usable]
        params += [pytest.param(s["backend"], dtype, id=f"{s['backend']}-{dtype_name(dtype)}",
                                marks=pytest.mark.skip(reason=s["reason"])) for s in skipped]
    return params


def _dtype_params() -> list:
    return [pytest.param(dtype, id=dtype_name(dtype)) for dtype in DTYPES]


@lru_cache(maxsize=None)
def workload(dtype: torch.dtype) -> Workload:
    return make_workload(MODEL, NUMEL, dtype, DEVICE)


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    if DEVICE.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(DEVICE)

    return call


def fresh_state(wl: Workload) -> RuleStateLists:
    return RuleStateLists(step=[torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in wl.params],
                          exp_avg=[torch.zeros_like(p) for p in wl.params],
                          exp_avg_sq=[torch.zeros_like(p) for p in wl.params])


def coefficients(backend: KernelBackend, wl: Workload, explicit: bool) -> torch.Tensor:
    cfg = SurgeryConfig(method="ungrad" if explicit else "none")
    gram = backend.gramian(wl.grads_f, wl.grads_r if explicit else None)
    return backend.coefficients(gram, cfg, None, None)


backend_and_dtype = pytest.mark.parametrize("backend_name, dtype", _backend_params())


@backend_and_dtype
def test_gramian(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    benchmark(synced(lambda: backend.gramian(wl.grads_f, wl.grads_r)))


@backend_and_dtype
def test_coefficients(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    gram = backend.gramian(wl.grads_f, wl.grads_r)
    cfg = SurgeryConfig(method="ungrad", max_norm=1.0)
    benchmark(synced(lambda: backend.coefficients(gram, cfg, None, None)))


@backend_and_dtype
def test_combine(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    coef = coefficients(backend, wl, explicit=True)
    grads_f = [g.clone() for g in wl.grads_f]
    benchmark(synced(lambda: backend.combine_(grads_f, wl.grads_r, coef)))


@backend_and_dtype
def test_step_explicit_adamw(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    params, state = [p.clone() for p in wl.params], fresh_state(wl)
    coef = coefficients(backend, wl, explicit=True)
    benchmark(synced(lambda: backend.step_("adamw", params, wl.grads_f, wl.grads_r, state, coef, HYPER)))


@backend_and_dtype
def test_step_implicit_adamw(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    params, state = [p.clone() for p in wl.params], fresh_state(wl)
    coef = coefficients(backend, wl, explicit=False)
    benchmark(synced(lambda: backend.step_("adamw", params, wl.grads_f, None, state, coef, HYPER)))


@backend_and_dtype
def test_update_terms(benchmark, backend_name: str, dtype: torch.dtype) -> None:
    """The reduction of update-space surgery (docs/design.md, Update-space surgery), where a backend has it."""
    wl, backend = workload(dtype), dispatch.get_backend(backend_name, DEVICE, dtype)
    if not backend.supports_update_space(DEVICE):
        pytest.skip(f"backend {backend_name!r} has no update-space kernels here (its steps go to the torch backend)")
    params, state = [p.clone() for p in wl.params], fresh_state(wl)
    hp = dataclasses.replace(HYPER, uncorrected_preconditioner=True)
    benchmark(synced(lambda: backend.update_terms("adamw", params, wl.grads_f, wl.grads_r, state, hp)))


@pytest.mark.parametrize("dtype", _dtype_params())
def test_torch_fused_adamw(benchmark, dtype: torch.dtype) -> None:
    """The floor: torch's own fused AdamW kernel on the same tensors."""
    wl = workload(dtype)
    params = [p.clone().requires_grad_(True) for p in wl.params]
    for p, g in zip(params, wl.grads_f):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=HYPER.lr, weight_decay=HYPER.weight_decay, fused=True)
    benchmark(synced(opt.step))
