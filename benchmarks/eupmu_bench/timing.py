"""Step timing and host-synchronisation counting.

On CUDA each step is bracketed by CUDA events (device time of that step) and the whole loop is
also timed on the host clock with one synchronisation at each end (wall time per step, which
includes any host overhead the device had to wait for). On CPU both are the host clock.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

StepFn = Callable[[], None]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    wall_ms_per_step: float
    samples_ms: list[float]
    clock: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _noop() -> None:
    pass


def time_steps(step: StepFn, device: torch.device, repeats: int, before: StepFn | None = None) -> Timing:
    """Time ``repeats`` calls of ``step``; ``before`` runs ahead of each call, outside the timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    before = before or _noop
    if device.type == "cuda":
        return _time_cuda(step, before, device, repeats)
    return _time_host(step, before, repeats)


def _time_host(step: StepFn, before: StepFn, repeats: int) -> Timing:
    samples = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), min(samples), statistics.fmean(samples), samples, "perf_counter")


def _time_cuda(step: StepFn, before: StepFn, device: torch.device, repeats: int) -> Timing:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    synchronize(device)
    wall_start = time.perf_counter()
    for start, end in events:
        before()
        start.record()
        step()
        end.record()
    synchronize(device)
    wall_ms = (time.perf_counter() - wall_start) * 1e3 / repeats
    samples = [start.elapsed_time(end) for start, end in events]
    return Timing(statistics.median(samples), min(samples), wall_ms, samples, "cuda-events")


def count_host_syncs(step: StepFn, device: torch.device, before: StepFn | None = None) -> int | None:
    """Synchronising CUDA calls made by one ``step`` (torch's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    (before or _noop)()
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)
