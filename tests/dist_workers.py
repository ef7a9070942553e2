"""Worker processes for the distributed tests (imported by spawned children, so no pytest here).

Each scenario trains the same small model on the same data, split across ranks, and rank 0
saves the final full parameters (and every rank's multiplier w) for the parent to compare with a
single-process run on the concatenated batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from eupmu_kernels import EUPMU

STEPS = 4
FULL_BATCH = 8


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def full_batch(step: int):
    gen = torch.Generator().manual_seed(500 + step)
    x_f = torch.randn(FULL_BATCH, 6, generator=gen)
    x_r = torch.randn(FULL_BATCH, 6, generator=gen)
    y_f = torch.randint(0, 3, (FULL_BATCH,), generator=gen)
    y_r = torch.randint(0, 3, (FULL_BATCH,), generator=gen)
    return x_f, y_f, x_r, y_r


def rank_slice(batch, rank: int, world: int):
    n = FULL_BATCH // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def optimizer_config(mode: str) -> dict:
    if mode == "explicit":
        return dict(lr=0.05, rule="adamw", mode="explicit", max_grad_norm=1.0, backend="torch")
    return dict(lr=0.05, rule="sgd", momentum=0.9, mode="implicit", dual="paper", dual_lr=0.01, backend="torch")


def train(model, opt: EUPMU, mode: str, rank: int = 0, world: int = 1) -> None:
    ce = torch.nn.functional.cross_entropy
    for step in range(STEPS):
        x_f, y_f, x_r, y_r = rank_slice(full_batch(step), rank, world)
        opt.zero_grad()
        if mode == "explicit":
            ce(model(x_r), y_r).backward()  # forward + backward per loss: what DDP expects
            opt.stash_retain_grad()
            (-ce(model(x_f), y_f)).backward()
        else:
            opt.combine(-ce(model(x_f), y_f), ce(model(x_r), y_r)).backward()
        opt.step()


def single_process_result(mode: str) -> dict:
    model = make_model()
    opt = EUPMU(model.parameters(), **optimizer_config(mode))
    train(model, opt, mode)
    return {"params": [p.detach().clone() for p in model.parameters()], "gramian": opt.stats().get("gramian"),
            "w": None if opt.w is None else opt.w.clone()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_wrapped(wrapper: str, mode: str, rank: int, world: int) -> dict:
    model = make_model()
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        params = model.module.parameters
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        params = model.parameters
    opt = EUPMU(params(), **optimizer_config(mode))
    train(model, opt, mode, rank, world)
    w = opt.w.reshape(1).clone() if opt.w is not None else torch.zeros(1)
    all_w = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(all_w, w)
    return {"params": [_full(p.detach()).clone() for p in params()], "gramian": opt.stats().get("gramian"),
            "w_per_rank": torch.cat(all_w)}


def _zero_style_gramian(rank: int, world: int) -> dict:
    """Flat parameter shards with a process group: the Gramian must be the global one."""
    gen = torch.Generator().manual_seed(7)
    g_f, g_r = torch.randn(101, generator=gen), torch.randn(101, generator=gen)
    bounds = [0, 40, 101]
    shard = slice(bounds[rank], bounds[rank + 1])
    p = torch.nn.Parameter(torch.zeros(bounds[rank + 1] - bounds[rank]))
    opt = EUPMU([p], lr=0.1, rule="sgd", mode="explicit", process_group=dist.group.WORLD, backend="torch")
    p.grad = g_r[shard].clone()
    opt.stash_retain_grad()
    p.grad = g_f[shard].clone()
    opt.step()
    return {"gramian": opt.stats()["gramian"].clone(),
            "expected": torch.stack([g_f.double() @ g_f.double(), g_f.double() @ g_r.double(),
                                     g_r.double() @ g_r.double()])}


def worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"{wrapper}_{mode}": _run_wrapped(wrapper, mode, rank, world)
                   for wrapper in ("ddp", "fsdp2") for mode in ("explicit", "implicit")}
        results["zero_gramian"] = _zero_style_gramian(rank, world)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
