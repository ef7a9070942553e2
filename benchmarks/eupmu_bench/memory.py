"""Memory probes: what a piece of code allocates (net) and at most (peak), in bytes.

CUDA: the caching allocator's ``memory_allocated`` / ``max_memory_allocated`` counters.
CPU: tracemalloc cannot see torch's allocations, torch keeps no CPU allocator statistics, and
the process RSS hides memory that the C allocator reuses from its heap. So the CPU probe runs
the code under ``torch.profiler`` with ``profile_memory=True`` and replays the allocation and
free events in time order: exact for tensor memory, at the granularity of one op (a temporary
that an op allocates and frees internally is not seen). The profiler's overhead does not matter
because the probe never runs during timed steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import torch

T = TypeVar("T")

_MEMINFO = Path("/proc/meminfo")
MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class MemoryUse:
    net_bytes: int  # still allocated when the code returned
    peak_bytes: int  # the most it had allocated at any moment


class MemoryProbe(Protocol):
    source: str

    def measure(self, fn: Callable[[], T]) -> tuple[T, MemoryUse | None]:
        """Run ``fn``; return its result and what it allocated (None when unknown)."""


class CudaAllocatorProbe:
    source = "CUDA caching allocator (memory_allocated, max_memory_allocated)"

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
    source = "torch.profiler memory events (CPU tensor allocations, op granularity)"

    def measure(self, fn: Callable[[], T]) -> tuple[T, MemoryUse]:
        # Without this, kineto prints start/stop lines to stderr around every profile.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        return result, replay_allocations(prof.profiler.kineto_results.events(), torch.autograd.DeviceType.CPU)


def replay_allocations(events, device_type: torch.autograd.DeviceType) -> MemoryUse:
    """Net and peak from the profiler's raw allocation (+bytes) and free (-bytes) records.

    (The aggregated ``FunctionEvent`` view attributes frees to enclosing scopes, which hides
    peaks, so the raw kineto records are replayed in time order instead.)
    """
    records = [(e.start_ns(), e.nbytes()) for e in events
               if e.name() == MEMORY_EVENT and e.device_type() == device_type]
    current = peak = 0
    for _, nbytes in sorted(records):
        current += nbytes
        peak = max(peak, current)
    return MemoryUse(current, peak)


class NullProbe:
    source = "unavailable"

    def measure(self, fn: Callable[[], T]) -> tuple[T, None]:
        return fn(), None


def memory_probe(device: torch.device) -> MemoryProbe:
    if device.type == "cuda":
        return CudaAllocatorProbe(device)
    if device.type == "cpu":
        return CpuProfilerProbe()
    return NullProbe()


def available_bytes(device: torch.device) -> int | None:
    """Memory a benchmark case may still allocate on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
