"""Peak tensor memory of a piece of work, on CPU or CUDA.

On CUDA the caching allocator's peak statistics are used. On CPU there are no allocator
statistics, so every storage created by an operator is counted until it is freed: a
``TorchDispatchMode`` sees each operator's outputs, and a finaliser on the storage (whose
Python object torch keeps alive as long as the storage lives) subtracts it again. Tensors that
existed before the measurement (the model's parameters) are not counted; outputs that alias an
input (in-place updates, views) are not new memory.

The dispatch mode adds Python work to every operator, so measure a few steps, never a timed run.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = float(2 ** 20)


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of storages created inside the mode and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, tensor: Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in inputs or key in self._live:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor) and leaf.device.type == "cpu":
                self._track(leaf, inputs)
        return out


def peak_bytes(work: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated by ``work()`` above what existed before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    mode = LiveTensorBytes()
    with mode:
        work()
    return mode.peak


def peak_mib(work: Callable[[], object], device: torch.device) -> float:
    return peak_bytes(work, device) / MIB
