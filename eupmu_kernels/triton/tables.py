"""Device tables that let one kernel launch cover a whole list of tensors.

A kernel over a group of tensors gets, instead of one pointer per tensor, a table on the device:

* ``addresses[r, i]``: the address (``data_ptr``) of tensor ``i`` in *role* ``r`` (param, g_f,
  g_r, state...); the kernel casts it to a typed pointer,
* ``numels[i]``: the element count of tensor ``i`` (the same in every role),
* per block of ``BLOCK`` elements: the tensor it belongs to (``block_owner``), its position in
  that tensor (``block_index``) and whether it may take the fast path (``block_fast``: a full
  block whose addresses in every role are 16-byte aligned, so loads need neither a mask nor a
  scalar fallback and can be vectorised),
* optionally ``scalar_addresses[i]``: the address of a per-tensor 0-dim tensor (the ``step``).

Tensors are assumed dense, with all roles of one index laid out identically (checked by the
backend), so tensor ``i`` is the ``numels[i]`` consecutive elements starting at its address.
Empty tensors own no block.

Tables depend only on the addresses and sizes, so they are cached by exactly those: while the
optimizer's tensors stay where they are, no table is rebuilt and nothing is copied to the device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

BLOCK = 4096
ALIGN_BYTES = 16
# The backward-pass hooks launch one Gramian per parameter and phase, so a model of P parameter
# tensors uses about 2P + a few tables per step in steady state: room for large models (tables are
# a few hundred bytes each on the device).
CACHE_CAPACITY = 8192

TableKey = tuple


@dataclass(frozen=True)
class TensorTable:
    addresses: Tensor  # int64 [n_roles, n_tensors]
    numels: Tensor  # int64 [n_tensors]
    block_owner: Tensor  # int64 [max(n_blocks, 1), rounded up to even]
    block_index: Tensor  # int64 [same]
    block_fast: Tensor  # int64 [same]: 1 for a full, aligned block
    scalar_addresses: Tensor | None  # int64 [n_tensors]
    n_tensors: int
    n_blocks: int

    def role(self, r: int) -> Tensor:
        return self.addresses[r]


def _blocks(numels: list[int], aligned: list[bool], block: int) -> tuple[Tensor, Tensor, Tensor]:
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    n_blocks = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts
    index = torch.arange(n_blocks, dtype=torch.int64) - torch.repeat_interleave(first_block, counts)
    sizes = torch.tensor(numels, dtype=torch.int64)
    full = (index + 1) * block <= sizes[owner]
    fast = full & torch.tensor(aligned, dtype=torch.bool)[owner]
    return owner, index, fast.to(torch.int64)


def _even(n: int) -> int:
    return n + (n % 2)


def _build(device: torch.device, addresses: list[list[int]], numels: list[int],
           scalar_addresses: list[int] | None, block: int) -> TensorTable:
    n = len(numels)
    aligned = [all(role[i] % ALIGN_BYTES == 0 for role in addresses) for i in range(n)]
    owner, index, fast = _blocks(numels, aligned, block)
    n_blocks = owner.numel()
    # Every section (and every role row) starts on a 16-byte boundary: sections hold an even
    # number of int64 values. The kernels then always get 16-byte aligned table pointers, so
    # Triton compiles a single variant per kernel whatever the tensor and block counts.
    n_pad, b_pad = _even(n), _even(max(n_blocks, 1))

    def padded(values: Tensor, length: int) -> Tensor:
        return torch.cat([values, torch.zeros(length - values.numel(), dtype=torch.int64)])

    rows = torch.tensor(addresses, dtype=torch.int64).reshape(len(addresses), n)
    parts = [padded(row, n_pad) for row in rows] + [padded(torch.tensor(numels, dtype=torch.int64), n_pad),
                                                    padded(owner, b_pad), padded(index, b_pad), padded(fast, b_pad)]
    if scalar_addresses is not None:
        parts.append(padded(torch.tensor(scalar_addresses, dtype=torch.int64), n_pad))
    flat = torch.cat(parts).to(device)
    sizes = [len(addresses) * n_pad, n_pad, b_pad, b_pad, b_pad] + ([n_pad] if scalar_addresses is not None else [])
    views = torch.split(flat, sizes)
    scalar_view = views[5][:n] if scalar_addresses is not None else None
    return TensorTable(
        addresses=views[0].view(len(addresses), n_pad)[:, :n], numels=views[1][:n], block_owner=views[2],
        block_index=views[3], block_fast=views[4], scalar_addresses=scalar_view, n_tensors=n, n_blocks=n_blocks)


class TableCache:
    """Least-recently-used cache of tables keyed by (device, block, addresses, sizes)."""

    def __init__(self, capacity: int = CACHE_CAPACITY) -> None:
        self.capacity = capacity
        self._tables: OrderedDict[TableKey, TensorTable] = OrderedDict()
        self.builds = 0

    def get(self, device: torch.device, roles: Sequence[Sequence[Tensor]],
            scalars: Sequence[Tensor] | None = None, block: int = BLOCK) -> TensorTable:
        addresses = tuple(tuple(t.data_ptr() for t in role) for role in roles)
        numels = tuple(t.numel() for t in roles[0])
        scalar_addresses = None if scalars is None else tuple(t.data_ptr() for t in scalars)
        key = (device, block, addresses, numels, scalar_addresses)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = _build(device, [list(a) for a in addresses], list(numels),
                       None if scalar_addresses is None else list(scalar_addresses), block)
        self.builds += 1
        self._tables[key] = table
        if len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()


TABLES = TableCache()


def tensor_table(device: torch.device, roles: Sequence[Sequence[Tensor]],
                 scalars: Sequence[Tensor] | None = None) -> TensorTable:
    """The (cached) table of ``roles`` (aligned lists of tensors) and optional per-tensor scalars."""
    return TABLES.get(device, roles, scalars)
