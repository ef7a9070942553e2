"""Data-parallel and sharded training support (docs/design.md, Scale-out).

- Replicated data parallelism (DDP): gradients are already averaged over ranks, so every rank
  holds the full g_f and g_r and the local Gramian *is* the global one; no collective is needed.
  Only the loss scalars that drive the multiplier differ per rank: they are averaged.
- Sharded parameters (FSDP2 DTensors with a ``Shard`` placement, or ZeRO-style flat shards
  announced with ``process_group=``): each rank holds a slice of every gradient, so the Gramian
  is a sum of per-rank partial Gramians: one all-reduce of three float64 numbers.

Collectives here are issued on the device stream; nothing reads a value back to the host.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

try:  # DTensor is public from torch 2.4; keep the import optional for minimal builds
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: Tensor) -> Tensor:
    """The rank-local tensor that kernels can write in place (the tensor itself if not a DTensor)."""
    return t._local_tensor if is_dtensor(t) else t


def shard_group(p: Tensor, explicit_group: dist.ProcessGroup | None):
    """The process group over which this parameter's Gramian contribution must be summed.

    None means the local contribution is already global (a plain or replicated tensor).
    """
    if is_dtensor(p):
        mesh = p.device_mesh
        shard_dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
        if not shard_dims:
            return None
        if len(shard_dims) > 1:
            raise NotImplementedError(f"parameter sharded over {len(shard_dims)} mesh dimensions; "
                                      "EUPMU supports one sharded dimension (FSDP2 / HSDP)")
        return mesh.get_group(shard_dims[0])
    return explicit_group


def all_reduce_sum_(t: Tensor, group) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def resolve_data_parallel_group(group):
    """``"auto"``: the default group when torch.distributed runs with more than one rank."""
    if group != "auto":
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def multi_rank() -> bool:
    """True when torch.distributed runs with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(t: Tensor, group) -> Tensor:
    """Average a (small) tensor over the ranks of ``group``; identity when group is None."""
    if group is None:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)
