"""The device's achievable memory bandwidth, measured in the same run as the benchmarks.

CUDA: a device-to-device ``copy_`` counting bytes read plus written (8 B per fp32 element).
CPU: an in-place ``a.add_(b)`` counting 12 B per element (read a, read b, write a); a CPU
``copy_`` under-reports because its write-allocate read of the destination is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import time_steps


@dataclass(frozen=True)
class Bandwidth:
    gbps: float
    kernel: str
    bytes_per_element: int
    numel: int
    median_ms: float


def measure_copy_bandwidth(device: torch.device, numel: int, repeats: int = 5) -> Bandwidth:
    a = torch.rand(numel, device=device)
    b = torch.rand(numel, device=device)
    if device.type == "cuda":
        kernel, per_element = "b.copy_(a)", 8

        def op() -> None:
            b.copy_(a)
    else:
        kernel, per_element = "a.add_(b)", 12

        def op() -> None:
            a.add_(b)

    op()  # first touch and warm-up
    timing = time_steps(op, device, repeats)
    gbps = per_element * numel / (timing.median_ms * 1e-3) / 1e9
    return Bandwidth(gbps, kernel, per_element, numel, timing.median_ms)
