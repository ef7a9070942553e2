"""Input checks that raise errors naming the offending tensor and the problem."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _require_strided(t: Tensor, what: str) -> None:
    if t.layout != torch.strided:
        raise RuntimeError(f"{what} is sparse ({t.layout}); only dense tensors are supported")


def check_gradient(grad: Tensor, param: Tensor, describe: Callable[[], str]) -> None:
    """A gradient must be dense and match its parameter's shape, device and dtype.

    ``describe()`` names the gradient; it is only called when the check fails.
    """
    if (grad.layout == torch.strided and grad.device == param.device and grad.dtype == param.dtype
            and grad.shape == param.shape):
        return
    what = describe()
    if grad.layout != torch.strided:
        raise RuntimeError(f"{what} is a sparse gradient ({grad.layout}); EUPMU supports dense gradients only")
    if grad.device != param.device:
        raise RuntimeError(f"{what} is on {grad.device} but its parameter is on {param.device}")
    if grad.dtype != param.dtype:
        raise RuntimeError(f"{what} has dtype {grad.dtype} but its parameter has dtype {param.dtype}")
    raise RuntimeError(f"{what} has shape {tuple(grad.shape)} but its parameter has shape {tuple(param.shape)}")


def check_pairs(a: Sequence[Tensor], b: Sequence[Tensor] | None, name_a: str, name_b: str) -> None:
    """Two aligned tensor lists: same length, each pair on one device with one dtype and size."""
    for i, x in enumerate(a):
        _require_strided(x, f"{name_a}[{i}]")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name_a}[{i}] has dtype {x.dtype}; expected a floating-point tensor")
    if b is None:
        return
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        _require_strided(y, f"{name_b}[{i}]")
        if x.device != y.device:
            raise RuntimeError(f"{name_b}[{i}] is on {y.device} but {name_a}[{i}] is on {x.device}")
        if x.dtype != y.dtype:
            raise TypeError(f"{name_b}[{i}] has dtype {y.dtype} but {name_a}[{i}] has dtype {x.dtype}")
        if x.numel() != y.numel():
            raise ValueError(f"{name_b}[{i}] has {y.numel()} elements but {name_a}[{i}] has {x.numel()}")


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the tensor covers exactly numel() consecutive elements."""
    if t.numel() <= 1:
        return True
    pairs = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    expected = 1
    for st, sz in pairs:
        if st != expected:
            return False
        expected *= sz
    return True
