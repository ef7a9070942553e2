"""Where a step spends its time and memory: torch.profiler on naive surgery vs EUPMU.

    python -m eupmu_bench.profile_step --numel 4e6 --steps 3 --out runs/profile

For each method: one untimed warm-up step, then ``--steps`` profiled steps. Writes
``trace_<method>.json`` (open in chrome://tracing or https://ui.perfetto.dev),
``ops_<method>.txt`` (the top ops/kernels by self time) and ``summary.md`` (per method: time per
profiled step, the copies it makes, its host synchronisations and its peak extra memory).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from eupmu_bench.baselines import PreparedStep, Settings
from eupmu_bench.cli import DTYPES, resolve_device
from eupmu_bench.methods import METHODS
from eupmu_bench.timing import synchronize
from eupmu_bench.workloads import FAMILIES, make_workload
from torch.profiler import ProfilerActivity, profile, record_function

from eupmu_unlearn import cli_args
from eupmu_unlearn.memory import replay_allocations
from eupmu_unlearn.tables import markdown_table

COPY_OPS = ("aten::cat", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::contiguous")
# `if tensor < 0:` and `.item()` end in this op: a read of one scalar by the host (of a CPU or a
# device tensor: torch.optim's non-fused steps read their CPU step counters this way too).
SCALAR_READ_OP = "aten::_local_scalar_dense"
# CUDA runtime calls that block the host until the device is done.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
DEFAULT_METHODS = ("naive-clip-fused", "composed", "eupmu-explicit")


@dataclass
class OpRow:
    name: str
    calls: int
    self_cpu_ms: float
    self_device_ms: float
    alloc_bytes: int  # net allocation of the op including its children (clone -> empty_like)


@dataclass
class Profiled:
    method: str
    ms_per_step: float
    ops: list[OpRow]
    peak_extra_bytes: int
    device_syncs: int | None  # None off CUDA
    table: str


def _device_time_us(avg: Any) -> float:
    return float(getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0)))


def _device_memory(avg: Any) -> int:
    return int(getattr(avg, "device_memory_usage", getattr(avg, "cuda_memory_usage", 0)))


def _op_rows(averages: Any, device: torch.device) -> list[OpRow]:
    rows = []
    for avg in averages:
        alloc = _device_memory(avg) if device.type == "cuda" else int(avg.cpu_memory_usage)
        rows.append(OpRow(avg.key, avg.count, avg.self_cpu_time_total / 1e3, _device_time_us(avg) / 1e3, alloc))
    return rows


def _sort_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "self_cpu_time_total"
    probe = torch.autograd.profiler_util.FunctionEventAvg()
    return "self_device_time_total" if hasattr(probe, "self_device_time_total") else "self_cuda_time_total"


def _peak_extra(prof: profile, device: torch.device) -> int:
    device_type = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    return replay_allocations(prof.profiler.kineto_results.events(), device_type).peak_bytes


def profile_method(prepared: PreparedStep, name: str, device: torch.device, steps: int, out: Path,
                   row_limit: int) -> Profiled:
    if prepared.before:
        prepared.before()
    prepared.step()  # warm-up (state allocation, kernel compilation) outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    synchronize(device)
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        start = time.perf_counter()
        for i in range(steps):
            if prepared.before:
                prepared.before()
            with record_function(f"{name} step {i}"):
                prepared.step()
        synchronize(device)  # one device sync of our own, subtracted below
        elapsed = time.perf_counter() - start
    prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    averages = prof.key_averages()
    table = averages.table(sort_by=_sort_key(device), row_limit=row_limit)
    (out / f"ops_{name}.txt").write_text(table + "\n")
    ops = _op_rows(averages, device)
    syncs = sum(op.calls for op in ops if op.name in SYNC_CALLS) - 1 if device.type == "cuda" else None
    return Profiled(name, elapsed * 1e3 / steps, ops, _peak_extra(prof, device), syncs, table)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def summary_markdown(results: list[Profiled], steps: int, grad_bytes: int, header: str) -> str:
    columns = ["method", "ms/step (profiled)", "copy ops per step", "copy self ms per step",
               "MiB allocated by copies per step", "scalar reads per step", "device syncs per step",
               "peak tensor memory (gradients)"]
    rows = []
    for r in results:
        copies = [op for op in r.ops if op.name in COPY_OPS]
        calls = ", ".join(f"{op.name.removeprefix('aten::')} x{op.calls // steps}" for op in copies) or "none"
        copy_ms = sum(op.self_cpu_ms + op.self_device_ms for op in copies) / steps
        alloc = sum(max(op.alloc_bytes, 0) for op in copies) // steps
        reads = sum(op.calls for op in r.ops if op.name == SCALAR_READ_OP) / steps
        syncs = "n/a" if r.device_syncs is None else f"{r.device_syncs / steps:g}"
        rows.append([r.method, f"{r.ms_per_step:.3g}", calls, f"{copy_ms:.3g}", _mib(alloc), f"{reads:g}", syncs,
                     f"{r.peak_extra_bytes / grad_bytes:.2f}"])
    lines = [header, "", markdown_table(columns, rows)]
    lines += ["", "Top ops by self time, per method (all profiled steps together; time spent in compiled "
              "extension kernels shows as the self time of the enclosing Optimizer.step):", ""]
    for r in results:
        top = sorted(r.ops, key=lambda op: op.self_cpu_ms + op.self_device_ms, reverse=True)[:8]
        lines.append(f"- {r.method}: " + ", ".join(f"{op.name} {op.self_cpu_ms + op.self_device_ms:.3g} ms"
                                                  for op in top))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = cli_args.Parser(prog="python -m eupmu_bench.profile_step", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=cli_args.count, default=4_000_000)
    p.add_argument("--model", default="gpt2", choices=sorted(FAMILIES))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", type=cli_args.device(allow_auto=True), default="auto")
    p.add_argument("--steps", type=cli_args.integer(1), default=3)
    cli_args.add_list_option(p, "--methods", cli_args.one_of(METHODS, "method"), DEFAULT_METHODS,
                             f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--backend", default=None, help="kernel backend of our optimizer (default: auto)")
    p.add_argument("--threads", type=cli_args.integer(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--row-limit", type=cli_args.integer(1), default=15)
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    wl = make_workload(args.model, args.numel, DTYPES[args.dtype], device)
    results = []
    for name in args.methods:
        method = METHODS[name]
        prepared = method.prepare(wl, args.backend if method.per_backend else None, Settings())
        results.append(profile_method(prepared, name, device, args.steps, args.out, args.row_limit))
        del prepared
    header = (f"Profile of {args.steps} steps on {wl.model} {wl.numel:.2e} {args.dtype} ({wl.n_tensors} tensors), "
              f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    summary = summary_markdown(results, args.steps, wl.tensor_bytes, header)
    (args.out / "summary.md").write_text(summary)
    for r in results:
        print(f"== {r.method}\n{r.table}")
    print(summary)
    print(f"wrote traces, op tables and summary.md to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
