"""The Gramian formed during the backward passes (docs/design.md, Gramian in the backward pass).

A post-accumulate-grad hook on every parameter computes that parameter's share of the Gramian as
soon as autograd has written its gradient, while the gradient is fresh (in cache on a CPU; on a
GPU the launch sits between the backward pass's own kernels), and stores it in a fixed slot:

* explicit mode, retain pass: <g_r, g_r>; forget pass: <g_f, g_f> and <g_f, g_r>;
* implicit mode: <g, g> (the non-finite guard and the clip factor need nothing else).

``step()`` then sums the slots in parameter order instead of reading every gradient again.
Slots are trusted only when the hook saw the gradient the step will use: each slot records the
tensor it read (weakly) and its version counter, and holds only if that tensor is still the one
in use, unchanged, and was accumulated once. Anything else (several micro-batches into one
gradient, a gradient edited or replaced after the backward pass, GradScaler's ``unscale_``, a
data-parallel all-reduce that rewrites ``.grad``) makes :meth:`gramian` return None and the
optimizer computes the Gramian in the step, as it does when the hooks are off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .buckets import Bucket
from .reductions import sum_rows

RETAIN, FORGET = 0, 1


@dataclass
class _Seen:
    """What a hook read: the tensor (weakly), its version then, and how often it was accumulated."""

    ref: weakref.ref
    version: int
    count: int = 1

    def still(self, t: Tensor | None) -> bool:
        return t is not None and self.count == 1 and self.ref() is t and t._version == self.version


class BackwardGramian:
    def __init__(self) -> None:
        self.buckets: list[Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, index in bucket)
        self._slots: list[Tensor] = []  # per bucket: float64 [n_params, 3]
        self._seen: dict[tuple[int, int], _Seen] = {}  # (RETAIN|FORGET, id(param)) -> what its hook read
        self._index: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # row indices on the device, per subset

    def bind(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets
        self._where = {id(p): (b, i) for b, bucket in enumerate(buckets) for i, p in enumerate(bucket.params)}
        self._slots = [torch.zeros(len(b.params), 3, dtype=torch.float64, device=b.device) for b in buckets]
        self._seen = {}
        self._index = {}

    def reset(self) -> None:
        """Forget every slot (after a step, and when gradients are cleared)."""
        if self._seen:
            for slots in self._slots:
                slots.zero_()
            self._seen = {}

    # ---------------------------------------------------------------- hooks

    def record(self, p: Tensor, phase: int, grad: Tensor, retain: Tensor | None) -> None:
        """Store p's share: phase RETAIN reads the retain gradient ``grad``; FORGET reads g_f (or the
        combined gradient) ``grad`` and, in explicit mode, the retain gradient ``retain``."""
        where = self._where.get(id(p))
        if where is None:
            return
        key = (phase, id(p))
        seen = self._seen.get(key)
        if seen is not None:  # a second accumulation: these slots can no longer be trusted
            seen.count += 1
            return
        b, i = where
        bucket = self.buckets[b]
        part = bucket.backend.gramian([grad], None if retain is None else [retain])
        if phase == RETAIN:
            self._slots[b][i, 2] = part[0]
        else:
            self._slots[b][i, :2] = part[:2]
        self._seen[key] = _Seen(weakref.ref(grad), grad._version)

    # ---------------------------------------------------------------- the step

    def gramian(self, work: Sequence[tuple[Bucket, list[int], list[Tensor], list[Tensor] | None]],
                has_forget: Callable[[Tensor], bool], has_retain: Callable[[Tensor], bool]) -> list[Tensor] | None:
        """Per bucket of ``work``, the float64[3] sum of its participating rows, or None when any
        slot does not describe the gradients the step will use. ``has_forget(p)`` / ``has_retain(p)``
        say whether the step reads a real gradient of p or a zero it made up."""
        parts = []
        for bucket, idx, grads_f, grads_r in work:
            b = self._where[id(bucket.params[0])][0]
            for k, i in enumerate(idx):
                p = bucket.params[i]
                if not self._holds(FORGET, p, grads_f[k] if has_forget(p) else None):
                    return None
                if grads_r is not None and not self._holds(RETAIN, p, grads_r[k] if has_retain(p) else None):
                    return None
            parts.append(sum_rows(self._rows(b, idx)))
        return parts

    def _rows(self, b: int, idx: list[int]) -> Tensor:
        slots = self._slots[b]
        if len(idx) == slots.shape[0]:
            return slots  # every parameter of the bucket takes part (idx is 0..n-1 in order)
        key = (b, tuple(idx))
        index = self._index.get(key)
        if index is None:  # built once per subset: no host-to-device copy in later steps
            index = self._index[key] = torch.tensor(idx, device=slots.device)
        return slots.index_select(0, index)

    def _holds(self, phase: int, p: Tensor, used: Tensor | None) -> bool:
        seen = self._seen.get((phase, id(p)))
        if seen is None:  # no hook saw this gradient: right only if the step reads a zero
            return used is None
        return seen.still(used)
