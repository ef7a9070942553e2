"""Peak tensor memory of a block of work: the one memory figure of every command (docs/design.md).

What it measures: the most memory that torch's allocator had handed out to tensors at any moment
inside the block, minus what it had handed out when the block started. Everything the block
creates counts (optimizer state, gradients, retain buffers, activations, temporaries, including
those allocated inside compiled kernels); what existed before it (the model's weights, data
already on the device) does not, nor does memory outside torch's allocator (Python objects,
libraries, the C allocator's caches). Every result JSON reports it as ``peak_tensor_mib``.

- CUDA: the caching allocator's counters (``memory_allocated`` at the start,
  ``max_memory_allocated`` after a reset).
- CPU: torch keeps no CPU allocator statistics, so the block runs under ``torch.profiler`` with
  ``profile_memory=True`` and its allocation and free records are replayed in time order. The
  profiler adds a few microseconds per operator: nothing next to a language-model step, a lot
  next to a tiny classifier's, so such runs measure memory on a separate copy of a few steps.

Why not the process's resident set size: it would differ between CPU and CUDA, depend on a
sampling interval, on whatever else the process holds and on whether the C allocator handed freed
memory back to the system; the tensor count is exact and means the same on both devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch

T = TypeVar("T")

FIELD = "peak_tensor_mib"
# Unlearning runs measure on a separate copy over their first steps: the peak is reached once the
# optimizer state exists (step 1), and the CPU profiler keeps every record of the block in memory
# (about 0.5 GB per SmolLM2-135M step), so a whole run under it can exhaust the machine.
PROBE_STEPS = 3
MIB = float(2 ** 20)
_MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class MemoryUse:
    net_bytes: int  # still allocated when the block ended (above the start)
    peak_bytes: int  # the most allocated at any moment (above the start)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


class MemoryProbe(Protocol):
    source: str  # what was measured, for the results

    def measure(self, fn: Callable[[], T]) -> tuple[T, MemoryUse | None]:
        """Run ``fn``; its result and the tensor memory it used (None when unknown)."""


class CudaAllocatorProbe:
    source = "peak tensor memory: CUDA caching allocator counters"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], T]) -> tuple[T, MemoryUse]:
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        result = fn()
        torch.cuda.synchronize(self.device)
        return result, MemoryUse(torch.cuda.memory_allocated(self.device) - base,
                                 torch.cuda.max_memory_allocated(self.device) - base)


class CpuProfilerProbe:
    source = "peak tensor memory: torch.profiler allocation records (CPU)"

    def measure(self, fn: Callable[[], T]) -> tuple[T, MemoryUse]:
        # Without this, kineto prints start/stop lines to stderr around every profile.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        return result, replay_allocations(prof.profiler.kineto_results.events(), torch.autograd.DeviceType.CPU)


class NullProbe:
    source = "unavailable on this device"

    def measure(self, fn: Callable[[], T]) -> tuple[T, None]:
        return fn(), None


def replay_allocations(events, device_type: torch.autograd.DeviceType) -> MemoryUse:
    """Net and peak from the profiler's raw allocation (+bytes) and free (-bytes) records.

    (The aggregated ``FunctionEvent`` view attributes frees to enclosing scopes, which hides
    peaks, so the raw kineto records are replayed in time order instead.)
    """
    records = [(e.start_ns(), e.nbytes()) for e in events
               if e.name() == _MEMORY_EVENT and e.device_type() == device_type]
    current = peak = 0
    for _, nbytes in sorted(records):
        current += nbytes
        peak = max(peak, current)
    return MemoryUse(current, peak)


def memory_probe(device: torch.device | str) -> MemoryProbe:
    device = torch.device(device)
    if device.type == "cuda":
        return CudaAllocatorProbe(device)
    if device.type == "cpu":
        return CpuProfilerProbe()
    return NullProbe()


def peak_tensor_mib(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float | None]:
    """Run ``fn``; its result and its peak tensor memory in MiB (None when the device has no probe)."""
    result, use = memory_probe(device).measure(fn)
    return result, None if use is None else use.peak_mib
