"""The retain gradient of explicit mode (docs/design.md, Retain capture).

Explicit mode needs g_r beside g_f. :class:`RetainCapture` keeps it in one of three ways
(``EUPMU(retain_capture=...)``):

* ``"views"``: one flat buffer per bucket (``Bucket.retain``); ``clear()`` zeroes it and points
  each ``.grad`` at its view, so the retain backward pass accumulates g_r there with no copy;
  ``stash()`` then detaches the views;
* ``"copy"``: the same buffer, filled by ``stash()`` from whatever ``.grad`` holds;
* ``"reference"``: no buffer: ``stash()`` keeps the gradient tensors autograd produced for the
  retain pass and clears ``.grad``. Nothing is zeroed, copied or accumulated in place when the
  retain pass is one backward pass; further stashes add into the kept tensors.

``accumulate()`` is a context in which backward passes add into the retain gradient, with
``.grad`` (the forget gradient so far) set aside, so retain and forget micro-batches interleave.

Which parameters *have* a retain gradient follows ``torch.optim``: one whose ``.grad`` stayed None
has none. With armed views ``.grad`` is never None, so the optimizer's post-accumulate-grad hook
tells :meth:`reached` which parameters autograd actually reached.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import Tensor

from . import distributed as dist_util
from .buckets import Bucket
from .validation import check_gradient

CAPTURE_MODES = ("views", "copy", "reference")


class RetainCapture:
    def __init__(self, mode: str) -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"retain_capture must be one of {CAPTURE_MODES}, got {mode!r}")
        self.mode = mode
        self.buckets: list[Bucket] = []
        self.captured = False  # a retain gradient was stashed since the last step
        self.armed = False  # .grad tensors currently point at the retain views
        self.in_retain_pass = False  # a backward pass now adds into the retain gradient
        self._listening = False  # record the parameters autograd reaches (armed, or inside accumulate())
        self._present: set[int] = set()  # ids of parameters that have a retain gradient
        self._reached: set[int] = set()  # armed views autograd accumulated into
        self._kept: dict[int, Tensor] = {}  # "reference" mode: the retain gradient tensors
        self._hooked: set[int] = set()  # parameters whose accumulation the optimizer reports
        self._where: dict[int, tuple[Bucket, int]] = {}

    # ---------------------------------------------------------------- binding

    def bind(self, buckets: list[Bucket], hooked: set[int]) -> None:
        """Use these buckets (rebuilt after a param-group change)."""
        self.disarm()
        self.buckets = buckets
        self._hooked = hooked
        self._where = {id(p): (bucket, i) for bucket in buckets for i, p in enumerate(bucket.params)}

    def reached(self, p: Tensor) -> None:
        """Called by the post-accumulate-grad hook of ``p``."""
        if self._listening:
            self._reached.add(id(p))

    # ---------------------------------------------------------------- per step

    def clear(self) -> None:
        """Forget the retain gradient; with views, zero the buffers and arm them for the next backward."""
        self.captured = False
        self.armed = False
        self._present = set()
        self._kept = {}
        if self.mode == "views":
            for bucket in self.buckets:
                if bucket.retain is not None:
                    bucket.retain.zero_()
            self.arm()
        self.in_retain_pass = True

    def release(self) -> None:
        """After a step: the retain gradient has been used."""
        self.captured = False
        self._present = set()
        self._kept = {}
        self.in_retain_pass = False

    def arm(self) -> None:
        self._reached = set()
        for bucket in self.buckets:
            bucket.ensure_retain_buffer()
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.requires_grad and p.grad is None and id(p) in self._hooked:
                    p.grad = view
        self.armed = True
        self._listening = True

    def disarm(self) -> None:
        self._listening = False
        if not self.armed:
            return
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.grad is view:
                    p.grad = None
        self.armed = False

    def stash(self, describe: Callable[[Tensor], str]) -> None:
        """Take the current ``.grad`` as (a further micro-batch of) g_r and clear ``.grad``."""
        first = not self.captured
        for bucket in self.buckets:
            if self.mode != "reference":
                bucket.ensure_retain_buffer()
            for i, p in enumerate(bucket.params):
                grad = p.grad
                if self.armed and grad is bucket.retain_views[i]:
                    if id(p) in self._reached:
                        self._present.add(id(p))
                elif grad is not None:
                    grad = dist_util.local_view(grad)
                    check_gradient(grad, dist_util.local_view(p), lambda p=p: f"retain gradient of {describe(p)}")
                    self._take(bucket, i, p, grad, overwrite=first and not self.armed)
                elif first and not self.armed and self.mode == "copy":
                    bucket.retain_views[i].zero_()  # the buffer may hold an older g_r
                p.grad = None
        self.armed = False
        self._listening = False
        self.captured = True
        self.in_retain_pass = False

    def _take(self, bucket: Bucket, i: int, p: Tensor, grad: Tensor, overwrite: bool) -> None:
        if self.mode == "reference":
            kept = self._kept.get(id(p))
            if kept is None:
                self._kept[id(p)] = grad
            else:
                kept.add_(grad)
        elif overwrite:
            bucket.retain_views[i].copy_(grad)
        else:
            bucket.retain_views[i].add_(grad)
        self._present.add(id(p))

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside the block add into the retain gradient; ``.grad`` is restored after."""
        self.disarm()
        if not self.captured:
            self._present, self._kept = set(), {}
            for bucket in self.buckets:
                if self.mode != "reference":
                    bucket.ensure_retain_buffer().zero_()
        held: dict[int, Tensor | None] = {}
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                held[id(p)] = p.grad
                p.grad = self._accumulator(bucket, i, p)
        self.captured = True
        self.in_retain_pass = True
        self._reached = set()
        self._listening = True
        try:
            yield
        finally:
            self.in_retain_pass = False
            self._listening = False
            for bucket in self.buckets:
                for i, p in enumerate(bucket.params):
                    self._collect_accumulated(bucket, i, p)
                    p.grad = held.get(id(p))

    def _accumulator(self, bucket: Bucket, i: int, p: Tensor) -> Tensor | None:
        """What ``.grad`` is inside ``accumulate()``: where autograd should add the retain gradient."""
        if self.mode == "reference":
            return self._kept.get(id(p))
        return bucket.retain_views[i] if id(p) in self._hooked else None

    def _collect_accumulated(self, bucket: Bucket, i: int, p: Tensor) -> None:
        grad = p.grad
        if self.mode == "reference":
            if grad is not None:
                self._kept[id(p)] = grad
                self._present.add(id(p))
        elif grad is bucket.retain_views[i]:
            if id(p) in self._reached:
                self._present.add(id(p))
        elif grad is not None:  # sharded (DTensor) gradients arrive as new tensors
            bucket.retain_views[i].add_(dist_util.local_view(grad))
            self._present.add(id(p))

    # ---------------------------------------------------------------- access

    def has(self, p: Tensor) -> bool:
        return id(p) in self._present

    def grad_r(self, bucket: Bucket, i: int) -> Tensor | None:
        """The retain gradient of ``bucket.params[i]``, or None when it has none."""
        p = bucket.params[i]
        if id(p) not in self._present:
            return None
        if self.mode == "reference":
            return dist_util.local_view(self._kept[id(p)])
        return bucket.retain_views[i]

    def grad_r_of(self, p: Tensor) -> Tensor | None:
        bucket, i = self._where[id(p)]
        return self.grad_r(bucket, i)

    def retain_buffers(self) -> list[Tensor]:
        """Every tensor that holds retain gradient (for an in-place unscale)."""
        if self.mode == "reference":
            return [dist_util.local_view(t) for t in self._kept.values()]
        return [b.retain for b in self.buckets if b.retain is not None]

    def restore(self, present: set[int]) -> None:
        """Declare the retain gradient still held (benchmarks re-run a step on the same g_r)."""
        self.captured = True
        self._present = set(present)

    @property
    def present(self) -> set[int]:
        return set(self._present)
