"""Deterministic float64 sums: the order depends only on the length of what is summed.

A flat ``torch.sum`` splits its input among the intra-op threads, so its rounding depends on the
thread count. Summing row by row over a ``[rows, ROW]`` view does not: each row is one thread's
work. These helpers are what makes the torch backend's Gramian, and the sum of the per-parameter
slots filled during the backward pass, bit-identical on any machine configuration.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW = 4096


def fixed_order_sum(v: Tensor) -> Tensor:
    """Sum of a 1-D float64 tensor in an order that depends only on its length."""
    while v.numel() > ROW:
        full = v.numel() // ROW * ROW
        rows = v[:full].view(-1, ROW).sum(1)
        v = torch.cat([rows, v[full:].sum().reshape(1)]) if full < v.numel() else rows
    return v.sum()


def sum_rows(rows: Tensor) -> Tensor:
    """Column sums of a float64 [n, k] tensor (per-tensor partial Gramians), in a fixed order."""
    if rows.shape[0] == 0:
        return torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    return torch.stack([fixed_order_sum(rows[:, k].contiguous()) for k in range(rows.shape[1])])
