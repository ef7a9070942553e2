"""The retain gradient of explicit mode (docs/design.md, Retain capture).

Explicit mode needs g_r beside g_f. :class:`RetainCapture` keeps it in one flat buffer per bucket
(``Bucket.retain``) and offers three ways to fill it:

* armed views (default): ``arm()`` points each ``.grad`` at its view of the zeroed buffer, so the
  retain backward pass accumulates g_r there with no copy; ``stash()`` then detaches the views;
* copy: without views, ``stash()`` copies (or adds) whatever ``.grad`` holds into the buffer;
* ``accumulate()``: a context in which backward passes add into the buffer, with ``.grad`` (the
  forget gradient so far) set aside, so retain and forget micro-batches interleave freely.

Which parameters *have* a retain gradient follows ``torch.optim``: one whose ``.grad`` stayed None
has none. With armed views ``.grad`` is never None, so a post-accumulate-grad hook on each
parameter records which ones autograd actually reached.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

from torch import Tensor

from . import distributed as dist_util
from .buckets import Bucket
from .validation import check_gradient


class RetainCapture:
    def __init__(self, use_views: bool) -> None:
        self.use_views = use_views
        self.buckets: list[Bucket] = []
        self.captured = False  # a retain gradient was stashed since the last step
        self.present: set[int] = set()  # ids of parameters that have a retain gradient
        self.armed = False  # .grad tensors currently point at the retain views
        self._listening = False  # inside an armed backward: hooks record the parameters reached
        self._reached: set[int] = set()
        self._hooks: list = []

    # ---------------------------------------------------------------- binding

    def bind(self, buckets: list[Bucket]) -> None:
        """Use these buckets (rebuilt after a param-group change); hooks on their parameters."""
        self.disarm()
        self.remove_hooks()
        self.buckets = buckets
        ref = weakref.ref(self)

        def reached(param: Tensor) -> None:
            capture = ref()
            if capture is not None and capture._listening:
                capture._reached.add(id(param))

        for bucket in buckets:
            for p in bucket.params:
                if p.requires_grad and not dist_util.is_dtensor(p):
                    self._hooks.append(p.register_post_accumulate_grad_hook(reached))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---------------------------------------------------------------- per step

    def clear(self) -> None:
        """Forget the retain gradient; with views, zero the buffers and arm them for the next backward."""
        self.captured = False
        self.present = set()
        self.armed = False
        for bucket in self.buckets:
            if bucket.retain is not None:
                bucket.retain.zero_()
        if self.use_views:
            self.arm()

    def release(self) -> None:
        """After a step: the retain gradient has been used."""
        self.captured = False
        self.present = set()

    def arm(self) -> None:
        self._reached = set()
        for bucket in self.buckets:
            bucket.ensure_retain_buffer()
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.requires_grad and p.grad is None and not dist_util.is_dtensor(p):
                    p.grad = view
        self.armed = True
        self._listening = True

    def disarm(self) -> None:
        if not self.armed:
            return
        self._listening = False
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.retain_views):
                if p.grad is view:
                    p.grad = None
        self.armed = False

    def stash(self, describe: Callable[[Tensor], str]) -> None:
        """Take the current ``.grad`` as (a further micro-batch of) g_r and clear ``.grad``."""
        first = not self.captured
        fill_by_copy = first and not self.armed  # the buffer may hold an older g_r: overwrite it
        self._listening = False
        for bucket in self.buckets:
            bucket.ensure_retain_buffer()
            for p, view in zip(bucket.params, bucket.retain_views):
                grad = p.grad
                if grad is view:
                    if id(p) in self._reached:
                        self.present.add(id(p))
                elif grad is not None:
                    grad = dist_util.local_view(grad)
                    check_gradient(grad, dist_util.local_view(p), lambda p=p: f"retain gradient of {describe(p)}")
                    if fill_by_copy:
                        view.copy_(grad)
                    else:
                        view.add_(grad)
                    self.present.add(id(p))
                elif fill_by_copy:
                    view.zero_()
                p.grad = None
        self.armed = False
        self.captured = True

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside the block add into the retain buffer; ``.grad`` is restored after."""
        self.disarm()
        held: dict[int, Tensor | None] = {}
        fresh = not self.captured
        self._reached = set()
        for bucket in self.buckets:
            bucket.ensure_retain_buffer()
            if fresh:
                bucket.retain.zero_()
            for p, view in zip(bucket.params, bucket.retain_views):
                held[id(p)] = p.grad
                p.grad = view if p.requires_grad and not dist_util.is_dtensor(p) else None
        self.captured = True
        self._listening = True
        try:
            yield
        finally:
            self._listening = False
            for bucket in self.buckets:
                for p, view in zip(bucket.params, bucket.retain_views):
                    if p.grad is view:
                        if id(p) in self._reached:
                            self.present.add(id(p))
                    elif p.grad is not None:  # sharded (DTensor) gradients arrive as new tensors
                        view.add_(dist_util.local_view(p.grad))
                        self.present.add(id(p))
                    p.grad = held.get(id(p))

    # ---------------------------------------------------------------- access

    def has(self, p: Tensor) -> bool:
        return id(p) in self.present

    def grad_of(self, bucket: Bucket, index: int) -> Tensor:
        return bucket.retain_views[index]
