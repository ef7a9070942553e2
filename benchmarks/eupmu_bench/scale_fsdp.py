"""The FSDP2 part of ``eupmu-bench scale``: one EUPMU step on the Llama sharded over ranks (CPU, gloo).

    torchrun --standalone --nproc_per_node=2 -m eupmu_bench.scale_fsdp --size 1.1e9 --out runs/bench-scale/fsdp

(``eupmu-bench scale`` starts exactly this after its single-process part, unless ``--no-fsdp``.)

Every rank builds the same random model as the single-process benchmark (same seed, bf16),
shards each decoder layer and then the root with ``fully_shard``, and takes one EUPMU step from
these weights (restored from a copy of the rank's initial shards on disk between steps, with a
fresh optimizer), explicit and implicit, in two batch layouts:

- ``replicated``: every rank runs the whole batch. FSDP averages identical gradients, so the step
  must equal the single-process step bit for bit: what differs is only the optimizer's sharded path
  (the partial Gramians of the shards, summed by an all-reduce).
- ``split``: each rank runs its own rows of the batch (data parallelism). The averaged gradient
  equals the full batch's up to bf16 rounding of the gradients, and Adam's first step moves each
  weight by at most lr (m/sqrt(v) = ±1 at step 1, up to eps), so the two results may differ per
  weight by at most 2·lr plus one bf16 spacing of the weight (the final rounding). The comparison
  reports the largest difference and its ratio to that bound.

The reference is the single-process step on the whole batch. Rank 0 computes it first, in a separate
process (so that its peak memory is not charged to the rank), and saves the parameters; the ranks
then gather each sharded parameter (``full_tensor()``, one at a time) for rank 0 to compare with
the saved one, read back a parameter at a time. Files (raw bf16) go under ``--out`` and are removed
at the end: the reference weights (2 bytes per parameter per mode) and each rank's initial shards. Per
rank it reports the peak resident set size (VmHWM) after each step: it includes building the full
model in bf16 before ``fully_shard`` (2 bytes per parameter, below the sharded step's peak from two
ranks on).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eupmu_kernels.distributed import local_view

from . import scale

MODES = ("explicit", "implicit")
LAYOUTS = ("replicated", "split")
RUNNERS = {"explicit": scale.Explicit, "implicit": scale.Implicit}


@dataclass(frozen=True)
class FsdpConfig:
    numel: int
    out: str
    vocab: int = scale.VOCAB
    batch: int = 2
    seq: int = 64
    lr: float = scale.LR
    seed: int = 0
    modes: tuple[str, ...] = MODES
    layouts: tuple[str, ...] = LAYOUTS
    threads: int = 1  # per rank
    keep_reference: bool = False


def _build(cfg: FsdpConfig):
    config = scale.llama_config(cfg.numel, cfg.vocab, max_positions=max(cfg.seq, 128))
    return config, scale.build_model(config, cfg.seed)


CHUNK = 1 << 20  # elements compared at a time (float64 temporaries stay small)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (a view: no copy for a contiguous tensor)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _read(f, like: torch.Tensor) -> torch.Tensor:
    """The next ``like.numel()`` elements of ``like``'s dtype from a raw file, shaped like it."""
    raw = np.fromfile(f, dtype=np.uint8, count=like.numel() * like.element_size())
    return torch.from_numpy(raw).view(like.dtype).view(like.shape)


def save_raw(tensors, path: str) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            _bytes(t).tofile(f)


def reference_step(cfg: FsdpConfig, mode: str, path: str) -> dict[str, Any]:
    """The single-process step on the whole batch (run in its own process); the parameters after it
    are written to ``path`` as raw bytes in ``named_parameters()`` order."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = scale.process_memory()
    _, model = _build(cfg)
    batches = scale.token_batches(cfg.vocab, cfg.batch, cfg.seq, cfg.seed)
    runner = RUNNERS[mode](model, batches, cfg.lr)
    t0 = time.perf_counter()
    losses = runner.backward()
    runner.step()
    seconds = time.perf_counter() - t0
    stats = runner.stats()
    peak = scale.process_memory()
    save_raw((p for _, p in model.named_parameters()), path)
    return {"losses": losses, "stats": stats, "gramian": _gramian(runner), "seconds": seconds,
            "start_rss_bytes": start.get("VmRSS"), "peak_rss_bytes": peak.get("VmHWM")}


def _gramian(runner: scale.Runner) -> list[float] | None:
    gram = runner.opt.stats().get("gramian")
    return None if gram is None else gram.tolist()


def _rank_batches(cfg: FsdpConfig, layout: str, rank: int, world: int) -> scale.Batches:
    full = scale.token_batches(cfg.vocab, cfg.batch, cfg.seq, cfg.seed)
    if layout == "replicated":
        return full
    rows = cfg.batch // world
    part = slice(rank * rows, (rank + 1) * rows)
    return scale.Batches(full.forget[part], full.retain[part])


def sharded_model(cfg: FsdpConfig, world: int) -> torch.nn.Module:
    """The benchmark's model (same seed: same weights), each decoder layer and the root sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, model = _build(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_shards(model: torch.nn.Module) -> list[torch.Tensor]:
    return [local_view(p.detach()) for p in model.parameters()]


def restore_shards(model: torch.nn.Module, path: str) -> None:
    """Copy the saved initial shards back into the model's shards, in place."""
    with open(path, "rb") as f:
        for shard in local_shards(model):
            shard.copy_(_read(f, shard))


def sharded_step(model: torch.nn.Module, cfg: FsdpConfig, mode: str, layout: str, rank: int, world: int,
                 reference_path: str) -> dict[str, Any]:
    """One step with a fresh optimizer; rank 0's result holds the comparison with the reference."""
    runner = RUNNERS[mode](model, _rank_batches(cfg, layout, rank, world), cfg.lr)
    t0 = time.perf_counter()
    losses = runner.backward()
    runner.step()
    seconds = time.perf_counter() - t0
    result = {"mode": mode, "layout": layout, "seconds": seconds, "losses": losses, "stats": runner.stats(),
              "gramian": _gramian(runner), "peak_rss_bytes": scale.process_memory().get("VmHWM")}
    runner.opt.zero_grad()
    del runner
    gc.collect()
    result.update(compare(model, reference_path, cfg.lr, rank))
    return result


def compare(model: torch.nn.Module, reference_path: str, lr: float, rank: int) -> dict[str, Any]:
    """Gather each sharded parameter in turn (all ranks); rank 0 compares it with the reference,
    read from its file one parameter at a time."""
    max_diff, max_ratio, differing, total, nonfinite = 0.0, 0.0, 0, 0, 0
    f = open(reference_path, "rb") if rank == 0 else None
    try:
        for _, p in model.named_parameters():
            full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            if f is not None:
                ref, got = _read(f, full).reshape(-1), full.reshape(-1)
                for start in range(0, got.numel(), CHUNK):
                    a, b = got[start:start + CHUNK], ref[start:start + CHUNK]
                    unequal = a != b
                    if not bool(unequal.any()):
                        continue
                    a, b = a[unequal].double(), b[unequal].double()
                    nonfinite += int((~torch.isfinite(a)).sum())  # NaN is unequal to everything
                    diff = (a - b).abs()
                    bound = 2 * lr * (1 + 1e-6) + scale.bf16_spacing(torch.maximum(a.abs(), b.abs()))
                    max_diff = max(max_diff, diff.max().item())
                    max_ratio = max(max_ratio, (diff / bound).max().item())
                    differing += diff.numel()
                total += got.numel()
            del full
    finally:
        if f is not None:
            f.close()
    if rank != 0:
        return {}
    return {"max_abs_diff": max_diff, "max_diff_over_bound": max_ratio, "differing_elements": differing,
            "elements": total, "nonfinite_elements": nonfinite,
            "bound": "2*lr + one bf16 spacing of the weight, per element"}


def run_ranks(cfg: FsdpConfig, rank: int, world: int) -> dict[str, Any] | None:
    """The whole FSDP2 part on an initialised process group; rank 0 returns the results.

    The sharded model is built once per rank and its initial shards saved, then restored before each
    step: a model sharded with ``fully_shard`` is not freed after a backward pass (reference cycles
    the garbage collector does not break), so building one per step would leak a model per step."""
    torch.set_num_threads(cfg.threads)
    start = scale.process_memory()
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    references: dict[str, Any] = {}
    if rank == 0:
        for mode in cfg.modes:
            outcome = scale.run_isolated(reference_step, cfg, mode, str(out / f"reference-{mode}.bin"))
            references[mode] = outcome.value if outcome.ok else {"failed": outcome.error,
                                                                  "traceback": outcome.traceback}
    failed = [[m for m, r in references.items() if "failed" in r]]
    dist.broadcast_object_list(failed, src=0)
    model = sharded_model(cfg, world)
    initial = str(out / f"initial-rank{rank}.bin")
    save_raw(local_shards(model), initial)
    steps = []
    try:
        for mode in cfg.modes:
            if mode in failed[0]:
                continue
            for layout in cfg.layouts:
                if steps:
                    restore_shards(model, initial)
                steps.append(sharded_step(model, cfg, mode, layout, rank, world, str(out / f"reference-{mode}.bin")))
    finally:
        os.unlink(initial)
    per_rank = [None] * world
    mine = {"rank": rank, "start_rss_bytes": start.get("VmRSS"), "peak_rss_bytes": scale.process_memory().get("VmHWM"),
            "peak_after_step_bytes": [s["peak_rss_bytes"] for s in steps],
            "seconds": [s["seconds"] for s in steps]}
    dist.all_gather_object(per_rank, mine)
    dist.barrier()
    if rank != 0:
        return None
    if not cfg.keep_reference:
        for mode in cfg.modes:
            (out / f"reference-{mode}.bin").unlink(missing_ok=True)
    from .machine import machine_info

    return {"config": asdict(cfg), "world": world, "backend": dist.get_backend(), "references": references,
            "steps": steps, "ranks": per_rank, "machine": machine_info(torch.device("cpu")),
            "shape": scale.describe_config(scale.llama_config(cfg.numel, cfg.vocab, max(cfg.seq, 128)))}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def failures(result: dict[str, Any], modes: tuple[str, ...] = MODES, layouts: tuple[str, ...] = LAYOUTS) -> list[str]:
    """What is wrong with an FSDP2 result: a missing step, or a parameter outside the bound
    (replicated: bit-identical; split: within 2 lr + one bf16 spacing)."""
    problems = [f"reference {m}: {r['failed']}" for m, r in result["references"].items() if "failed" in r]
    done = {(s["mode"], s["layout"]): s for s in result["steps"]}
    for mode in modes:
        for layout in layouts:
            s = done.get((mode, layout))
            if s is None:
                problems.append(f"{mode}/{layout}: no result")
            elif s["nonfinite_elements"]:
                problems.append(f"{mode}/{layout}: {s['nonfinite_elements']} weights are not finite")
            elif layout == "replicated" and s["max_abs_diff"] != 0.0:
                problems.append(f"{mode}/{layout}: differs from the single-process step by {s['max_abs_diff']:.3g}")
            elif layout == "split" and s["max_diff_over_bound"] > 1.0:
                problems.append(f"{mode}/{layout}: a weight differs by {s['max_diff_over_bound']:.3g} x the bound")
    return problems


def launch(cfg: FsdpConfig, ranks: int, timeout: float | None = None) -> dict[str, Any]:
    """Run this module under torchrun (``--standalone``: a free local port) and read its results."""
    import subprocess

    import eupmu_kernels

    args = ["--size", str(cfg.numel), "--vocab", str(cfg.vocab), "--batch", str(cfg.batch), "--seq",
            str(cfg.seq), "--lr", f"{cfg.lr:g}", "--seed", str(cfg.seed), "--modes", ",".join(cfg.modes),
            "--layouts", ",".join(cfg.layouts), "--threads", str(cfg.threads), "--out", cfg.out]
    # The ranks import the packages this process runs, wherever they were found.
    paths = [str(Path(__file__).resolve().parents[1]), str(Path(eupmu_kernels.__file__).resolve().parents[1])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "eupmu_bench.scale_fsdp", *args]
    results = Path(cfg.out) / "fsdp.json"
    results.unlink(missing_ok=True)
    try:
        done = subprocess.run(command, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"torchrun did not finish within {timeout:.0f} s"}
    if not results.exists():
        return {"failed": f"torchrun exited with status {done.returncode} and wrote no results"}
    out = json.loads(results.read_text())
    out["command"] = f"torchrun --standalone --nproc_per_node={ranks} -m eupmu_bench.scale_fsdp {shlex.join(args)}"
    return out


def spawned(rank: int, world: int, port: int, cfg: FsdpConfig) -> None:
    """Entry point for ``torch.multiprocessing.spawn`` (the tests), as torchrun's is :func:`main`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
    try:
        result = run_ranks(cfg, rank, world)
        if result is not None:
            write_json(Path(cfg.out) / "fsdp.json", result)
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    from eupmu_unlearn import cli_args

    p = cli_args.Parser(prog="python -m eupmu_bench.scale_fsdp",
                        description="Run under torchrun: one EUPMU step on the Llama sharded with FSDP2 (gloo), "
                                    "compared with the single-process step.")
    p.add_argument("--size", type=cli_args.count, default=int(1.1e9), help="parameters of the model")
    p.add_argument("--vocab", type=cli_args.integer(16), default=scale.VOCAB)
    p.add_argument("--batch", type=cli_args.integer(1), default=2, help="rows of the global batch")
    p.add_argument("--seq", type=cli_args.integer(2), default=64)
    p.add_argument("--lr", type=cli_args.positive, default=scale.LR)
    p.add_argument("--seed", type=cli_args.seed, default=0)
    cli_args.add_list_option(p, "--modes", cli_args.one_of(MODES, "mode"), MODES, "comma-separated: explicit,implicit")
    cli_args.add_list_option(p, "--layouts", cli_args.one_of(LAYOUTS, "layout"), LAYOUTS,
                             "comma-separated: replicated (every rank the whole batch), split (rows per rank)")
    p.add_argument("--threads", type=cli_args.integer(1), default=1, help="torch threads per rank")
    p.add_argument("--keep-reference", action="store_true",
                   help="keep the single-process parameters (raw bf16, reference-MODE.bin)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-scale/fsdp"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if "split" in args.layouts and args.batch % world:
        parser.error(f"argument --batch: {args.batch} rows do not split evenly over {world} ranks")
    cfg = FsdpConfig(args.size, str(args.out), args.vocab, args.batch, args.seq, args.lr, args.seed,
                     tuple(args.modes), tuple(args.layouts), args.threads, args.keep_reference)
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    try:
        result = run_ranks(cfg, rank, world)
    finally:
        dist.destroy_process_group()
    if result is None:
        return 0
    result["command"] = "torchrun --standalone --nproc_per_node=%d -m eupmu_bench.scale_fsdp %s" % (
        world, shlex.join(argv))
    write_json(Path(cfg.out) / "fsdp.json", result)
    print(format_fsdp(result))
    problems = failures(result, cfg.modes, cfg.layouts)
    for line in problems:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if problems else 0


def format_fsdp(result: dict[str, Any]) -> str:
    from eupmu_unlearn.tables import markdown_table

    gib = scale.GIB
    refs = result["references"]
    rows = []
    for s in result["steps"]:
        ref = refs.get(s["mode"], {})
        rows.append([s["mode"], s["layout"], f"{s['max_abs_diff']:.3g}", f"{s['max_diff_over_bound']:.3f}",
                     f"{s['differing_elements']:,} / {s['elements']:,}", _lam(s), _lam(ref),
                     f"{s['seconds']:.1f}", f"{ref.get('peak_rss_bytes', float('nan')) / gib:.2f}"])
    table = markdown_table(["mode", "batch layout", "max abs diff", "diff / bound", "weights differing",
                            "lambda or w (FSDP2)", "lambda or w (single)", "step s (rank 0)",
                            "single-process peak GiB"], rows)
    ranks = "; ".join(f"rank {r['rank']}: peak {r['peak_rss_bytes'] / gib:.2f} GiB "
                      f"(start {r['start_rss_bytes'] / gib:.2f})" for r in result["ranks"])
    return f"{table}\n\nper-rank peak resident memory: {ranks}"


def _lam(record: dict[str, Any]) -> str:
    stats = record.get("stats") or {}
    if "lambda" in stats:
        return f"λ {stats['lambda']:.6g}"
    if "w" in stats:
        return f"w {stats['w']:.6g}"
    return "-"


if __name__ == "__main__":
    raise SystemExit(main())
