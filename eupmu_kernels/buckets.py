"""Parameter buckets and the flat retain-gradient buffer.

Parameters are grouped by (param group, device, dtype) into buckets of at most
``max_numel`` elements (a parameter larger than that gets a bucket of its own). Each bucket owns
one flat buffer for the retain gradient g_r, allocated on first use; ``retain_views[i]`` is a
view of that buffer laid out exactly like parameter i (same shape and strides), so it can be
installed as ``param.grad`` and autograd accumulates the retain gradient straight into the
buffer: no copy, and never more than one extra gradient-sized buffer in total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .contract import KernelBackend
from .distributed import local_view
from .validation import is_dense

DEFAULT_BUCKET_NUMEL = 1 << 26
VIEW_ALIGN_BYTES = 16


@dataclass
class Bucket:
    group_index: int
    device: torch.device
    dtype: torch.dtype
    backend: KernelBackend  # resolved once, when the bucket is built
    reduce_group: Any = None  # process group summing this bucket's partial Gramian (sharded params)
    params: list[Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    retain: Tensor | None = None
    retain_views: list[Tensor] = field(default_factory=list)

    def add(self, param: Tensor) -> None:
        # Start every view on a 16-byte boundary so vectorised kernels can use aligned loads.
        align = max(1, VIEW_ALIGN_BYTES // self.dtype.itemsize)
        start = -(-self.numel // align) * align
        self.params.append(param)
        self.offsets.append(start)
        self.numel = start + local_view(param).numel()

    def ensure_retain_buffer(self) -> Tensor:
        """Allocate the flat retain buffer (zero-filled) and its per-parameter views once."""
        if self.retain is None:
            self.retain = torch.zeros(self.numel, dtype=self.dtype, device=self.device)  # padding stays zero
            locals_ = [local_view(p) for p in self.params]
            self.retain_views = [
                torch.as_strided(self.retain, t.shape, t.stride(), off) for t, off in zip(locals_, self.offsets)
            ]
        return self.retain


def build_buckets(param_groups: Iterable[dict], names: dict[int, str],
                  backend_of: Callable[[torch.device, torch.dtype], KernelBackend],
                  max_numel: int = DEFAULT_BUCKET_NUMEL,
                  reduce_group_of: Callable[[Tensor], Any] = lambda p: None) -> list[Bucket]:
    """Buckets in a deterministic order: by group, then by first appearance of
    (device, dtype, reduce group). Sizes and layouts are those of the rank-local tensors;
    ``names`` only serve error messages."""
    if max_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {max_numel}")
    buckets: list[Bucket] = []
    for gi, group in enumerate(param_groups):
        open_buckets: dict[tuple, Bucket] = {}
        for pi, p in enumerate(group["params"]):
            name = names.get(id(p), f"group {gi} param #{pi}")
            local = local_view(p)
            if not is_dense(local):
                raise ValueError(f"parameter {name!r} is not dense (strides {local.stride()}); "
                                 "EUPMU needs non-overlapping, dense parameters")
            reduce_group = reduce_group_of(p)
            key = (local.device, local.dtype, id(reduce_group))
            bucket = open_buckets.get(key)
            if bucket is None or (bucket.numel > 0 and bucket.numel + local.numel() > max_numel):
                bucket = Bucket(gi, local.device, local.dtype, backend_of(local.device, local.dtype), reduce_group)
                open_buckets[key] = bucket
                buckets.append(bucket)
            bucket.add(p)
    return buckets
