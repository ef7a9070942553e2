"""Run the benchmark grid: (model, size, dtype) workloads x (method, backend) cases.

One workload (parameters, g_f, g_r) is generated per (model, size, dtype); every case steps its
own copy of the parameters from it, so all methods see the same numbers. Kernel backends of
our optimizer that cannot run here are skipped with the reason recorded in the results.
"""

from __future__ import annotations

import gc
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from eupmu_kernels import dispatch
from eupmu_unlearn.memory import FIELD as MEMORY_FIELD
from eupmu_unlearn.memory import MIB, MemoryProbe, memory_probe

from .bandwidth import Bandwidth, measure_copy_bandwidth
from .baselines import PreparedStep, Settings
from .bytes_model import StorageSizes, gigabytes_per_second
from .machine import available_bytes, l3_cache_bytes, load_average, machine_info
from .methods import FLOOR, NAIVE_METHODS, Method
from .timing import count_host_syncs, time_steps
from .workloads import Workload, make_workload

BACKEND_NAMES = ("torch", "triton", "native")
# Memory per parameter a case may need, in units of the gradient size, beyond the workload:
# the parameter copy, two moments and naive surgery's flat copies and temporaries.
_CASE_GRADIENTS = 8


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    models: list[str]
    sizes: list[int]
    dtypes: list[torch.dtype]
    methods: list[Method]
    backends: list[str]
    repeats: int = 10
    warmup: int = 2
    rounds: int = 1  # passes over the cases, each in a rotated order; samples pooled per case
    settings: Settings = field(default_factory=Settings)
    bandwidth_numel: int = 10**8
    allow_interpreter: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Case:
    method: Method
    backend: str | None  # None for baselines (plain torch)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def usable_backends(requested: Iterable[str], device: torch.device, dtype: torch.dtype,
                    allow_interpreter: bool) -> tuple[list[str], list[dict[str, str]]]:
    """The requested kernel backends that run on (device, dtype), and why the others do not."""
    usable, skipped = [], []
    for name in requested:
        try:
            dispatch.get_backend(name, device, dtype)
        except dispatch.BackendUnavailableError as err:
            skipped.append({"backend": name, "dtype": dtype_name(dtype), "reason": str(err)})
            continue
        if name == "triton" and device.type == "cpu" and not allow_interpreter:
            skipped.append({"backend": name, "dtype": dtype_name(dtype),
                            "reason": "Triton on CPU runs in its interpreter, which is not a benchmark "
                                      "(pass --allow-interpreter to time it anyway)"})
            continue
        usable.append(name)
    return usable, skipped


def plan_cases(methods: list[Method], backends: list[str]) -> list[Case]:
    cases: list[Case] = []
    for method in methods:
        if method.per_backend:
            cases.extend(Case(method, b) for b in backends)
        else:
            cases.append(Case(method, None))
    return cases


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _needed_bytes(numel: int, dtype: torch.dtype) -> int:
    return (3 + _CASE_GRADIENTS) * numel * dtype.itemsize


def _prepare_and_warm_up(case: Case, wl: Workload, config: RunConfig) -> PreparedStep:
    prepared = case.method.prepare(wl, case.backend, config.settings)
    # At least one untimed step: it allocates the optimizer state, which "held" must include.
    for _ in range(max(1, config.warmup)):
        if prepared.before:
            prepared.before()
        prepared.step()
    if prepared.before:
        prepared.before()  # drops what the last step left in .grad, so only held state remains
    return prepared


def run_case(case: Case, wl: Workload, config: RunConfig, probe: MemoryProbe) -> dict[str, Any]:
    """One (method, backend) on one workload: memory, host syncs, then the timed steps."""
    device = config.device
    _release_memory(device)
    prepared, setup_use = probe.measure(lambda: _prepare_and_warm_up(case, wl, config))
    _, step_use = probe.measure(prepared.step)
    syncs = count_host_syncs(prepared.step, device, prepared.before)
    timing = time_steps(prepared.step, device, config.repeats, prepared.before)

    state_dtype = prepared.state_dtype
    held = None if setup_use is None else setup_use.net_bytes - prepared.harness_bytes
    sizes = StorageSizes.of(wl.dtype, state_dtype)
    per_param = case.method.bytes_per_param(sizes)
    grad_bytes = wl.numel * sizes.grad
    peak = None if step_use is None else step_use.peak_bytes
    working_set = wl.numel * (sizes.param + 2 * sizes.grad + 2 * sizes.state)
    del prepared
    return {
        "model": wl.model, "numel": wl.numel, "n_tensors": wl.n_tensors, "dtype": dtype_name(wl.dtype),
        "state_dtype": dtype_name(state_dtype),
        "method": case.method.name, "kind": case.method.kind, "backend": case.backend or "torch",
        "median_ms": timing.median_ms, "min_ms": timing.min_ms, "wall_ms_per_step": timing.wall_ms_per_step,
        "clock": timing.clock, "samples_ms": timing.samples_ms,
        "bytes_per_param": per_param, "gbps": gigabytes_per_second(per_param, wl.numel, timing.median_ms * 1e-3),
        "host_syncs": syncs,
        MEMORY_FIELD: None if peak is None else peak / MIB,
        "peak_tensor_grads": None if peak is None else peak / grad_bytes,
        "held_bytes": held,
        "held_grads": None if held is None else held / grad_bytes,
        "working_set_bytes": working_set,
    }


def add_relative_columns(records: list[dict[str, Any]], bandwidth_gbps: float, l3: int | None,
                         device: torch.device) -> None:
    """Ratios that need the whole (model, size, dtype) group: time / fused AdamW's, the fastest
    naive variant's time / this time, and the share of the measured copy bandwidth."""
    floors: dict[tuple, float] = {}
    naive: dict[tuple, float] = {}
    for r in records:
        key = (r["model"], r["numel"], r["dtype"])
        if r["method"] == FLOOR:
            floors[key] = r["median_ms"]
        if r["method"] in NAIVE_METHODS:
            naive[key] = min(naive.get(key, float("inf")), r["median_ms"])
    for r in records:
        key = (r["model"], r["numel"], r["dtype"])
        r["vs_fused_adamw"] = r["median_ms"] / floors[key] if key in floors else None
        r["speedup_vs_naive"] = naive[key] / r["median_ms"] if key in naive else None
        r["bandwidth_fraction"] = r["gbps"] / bandwidth_gbps
        r["cache_resident"] = (r["working_set_bytes"] <= l3) if (device.type == "cpu" and l3) else None


def _bandwidth_dict(b: Bandwidth) -> dict[str, Any]:
    return {"gbps": b.gbps, "kernel": b.kernel, "bytes_per_element": b.bytes_per_element, "numel": b.numel,
            "median_ms": b.median_ms}


def run(config: RunConfig, command: str, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run every case; ``progress(total)`` returns a progress bar (anything with update/set_description)."""
    device = config.device
    probe = memory_probe(device)
    plans, skipped = [], []
    for dtype in config.dtypes:
        backends, why = usable_backends(config.backends, device, dtype, config.allow_interpreter)
        skipped.extend(why)
        plans.append((dtype, plan_cases(config.methods, backends)))
    total = sum(len(cases) for _, cases in plans) * len(config.models) * len(config.sizes)
    bar = progress(total) if progress else None

    load_start = load_average()
    bandwidth_start = measure_copy_bandwidth(device, config.bandwidth_numel)
    records: list[dict[str, Any]] = []
    # Objects alive now (modules, ...) are never garbage: freezing them keeps the collections
    # between cases, which free each case's optimizer before the next one, fast.
    gc.collect()
    gc.freeze()
    try:
        for model in config.models:
            for dtype, cases in plans:
                for numel in config.sizes:
                    records.extend(_run_workload(model, numel, dtype, cases, config, probe, bar, skipped))
    finally:
        gc.unfreeze()
    bandwidth_end = measure_copy_bandwidth(device, config.bandwidth_numel)
    if bar is not None:
        bar.close()

    ceiling = max(bandwidth_start.gbps, bandwidth_end.gbps)
    add_relative_columns(records, ceiling, l3_cache_bytes(), device)
    return {
        "command": command,
        "machine": machine_info(device),
        "memory_source": probe.source,
        "load_average": {"start": load_start, "end": load_average()},
        "bandwidth": {"ceiling_gbps": ceiling, "start": _bandwidth_dict(bandwidth_start),
                      "end": _bandwidth_dict(bandwidth_end)},
        "settings": {"repeats": config.repeats, "rounds": config.rounds, "warmup": config.warmup, "lr": config.settings.lr,
                     "weight_decay": config.settings.weight_decay, "max_norm": config.settings.max_norm,
                     "state_dtype": None if config.settings.state_dtype is None
                     else dtype_name(config.settings.state_dtype)},
        "methods": {m.name: m.description for m in config.methods},
        "skipped": skipped,
        "records": records,
    }


def _run_workload(model: str, numel: int, dtype: torch.dtype, cases: list[Case], config: RunConfig,
                  probe: MemoryProbe, bar: Any, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    available = available_bytes(config.device)
    if available is not None and _needed_bytes(numel, dtype) > available:
        skipped.append({"model": model, "numel": str(numel), "dtype": dtype_name(dtype),
                        "reason": f"needs about {_needed_bytes(numel, dtype) / 2**30:.1f} GiB, "
                                  f"{available / 2**30:.1f} GiB available"})
        if bar is not None:
            bar.update(len(cases))
        return []
    wl = make_workload(model, numel, dtype, config.device, seed=config.seed)
    pooled: dict[int, dict[str, Any]] = {}
    failed: set[int] = set()
    for round_index in range(config.rounds):
        # Each round starts one case later, so a slow stretch of the machine falls on different
        # cases in different rounds instead of on the same neighbours every time.
        shift = round_index % len(cases)
        for index in [*range(shift, len(cases)), *range(shift)]:
            if index in failed:
                continue
            case = cases[index]
            name = f"{case.method.name}{'[' + case.backend + ']' if case.backend else ''}"
            if bar is not None:
                bar.set_description(f"{model} {numel:.0e} {dtype_name(dtype)} {name}")
            try:
                record = run_case(case, wl, config, probe)
            except Exception as err:  # one broken case must not cost the rest of a (GPU) run
                traceback.print_exc(file=sys.stderr)
                failed.add(index)
                pooled.pop(index, None)
                skipped.append({"model": model, "numel": str(numel), "dtype": dtype_name(dtype), "method": name,
                                "reason": f"failed: {type(err).__name__}: {err}", "failed": "yes"})
                # (its memory is released at the start of the next case, once the traceback is gone)
            else:
                pooled[index] = record if index not in pooled else pool_rounds(pooled[index], record)
            if bar is not None and round_index == config.rounds - 1:
                bar.update(1)
    del wl
    _release_memory(config.device)
    return [pooled[i] for i in sorted(pooled)]


def pool_rounds(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One record from two rounds of a case: timing over all samples; memory from the first."""
    samples = first["samples_ms"] + later["samples_ms"]
    median = statistics.median(samples)
    rounds = first.get("round_medians_ms", [first["median_ms"]]) + [later["median_ms"]]
    wall = (first["wall_ms_per_step"] * len(first["samples_ms"])
            + later["wall_ms_per_step"] * len(later["samples_ms"])) / len(samples)
    return {**first, "samples_ms": samples, "median_ms": median, "min_ms": min(samples),
            "wall_ms_per_step": wall, "round_medians_ms": rounds,
            "gbps": gigabytes_per_second(first["bytes_per_param"], first["numel"], median * 1e-3)}
