"""Wall time and peak memory of one block of work (an unlearning run).

On CUDA the peak comes from the caching allocator's statistics. On CPU there is no allocator
statistic, so a background thread samples the process's resident set size (RSS) every few
milliseconds; freed heap memory is first handed back to the OS (glibc ``malloc_trim``) so the
starting RSS is not inflated by earlier work. The CPU figure is therefore a sampled high-water
mark of the whole process, accurate to the sampling interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from dataclasses import dataclass

import torch


@dataclass
class Usage:
    seconds: float = 0.0
    start_bytes: int = 0
    peak_bytes: int = 0

    @property
    def extra_bytes(self) -> int:
        """Peak above the level at the start: what the block itself needed."""
        return max(0, self.peak_bytes - self.start_bytes)

    def as_dict(self) -> dict[str, float]:
        mb = 1024.0 ** 2
        return {"seconds": self.seconds, "start_mb": self.start_bytes / mb, "peak_mb": self.peak_bytes / mb,
                "extra_peak_mb": self.extra_bytes / mb}


def resident_bytes() -> int:
    """Current RSS of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def release_free_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class measure:
    """``with measure(device) as usage: ...``; fills ``usage`` on exit."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> Usage:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.usage.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.usage.start_bytes = self.usage.peak_bytes = resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self.usage

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.usage.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.usage.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.usage.peak_bytes = max(self.usage.peak_bytes, resident_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.usage.peak_bytes = max(self.usage.peak_bytes, resident_bytes())
