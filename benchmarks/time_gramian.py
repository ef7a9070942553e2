"""Wall time of the native backend's CPU Gramian pass (the C++ kernels), per thread count.

    python benchmarks/time_gramian.py --numel 2e7 --threads 1 2 --repeats 15

Times two ways of forming the Gramian of two gradients (8 bytes per fp32 parameter) and of one
gradient, on a GPT-2-shaped tensor list:

* ``total``: ``_C.gramian(a, b)``, every chunk partial summed in one fixed order in C++;
* ``per-tensor``: ``NativeBackend().gramian(a, b)``, what the optimizer calls: per-tensor float64
  totals from C++ (``per_tensor=True``), then the fixed-order column sum of
  ``eupmu_kernels.reductions.sum_rows``, bit-identical to the Gramian the backward-pass hooks form.

Thread counts and the two ways are interleaved round by round (every other round in reverse
order), so that a busy neighbour on a shared machine affects them alike; prints the median and
the best time and the bandwidth the median implies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: the eupmu_bench package lives next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eupmu_bench.workloads import make_workload  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=2e7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    from eupmu_kernels.backends.native_backend import NativeBackend, extension_error, load_extension

    ext = load_extension()
    if ext is None:
        print(f"the compiled extension does not import: {extension_error()}", file=sys.stderr)
        return 1
    backend = NativeBackend()
    wl = make_workload(args.model, int(args.numel), getattr(torch, args.dtype), "cpu")
    inputs = {"(g_f, g_r)": (wl.grads_f, wl.grads_r), "(g)": (wl.grads_f, None)}
    ways = {"total": ext.gramian, "per-tensor": backend.gramian}
    cases = {f"{way} {name}": (fn, a, b) for name, (a, b) in inputs.items() for way, fn in ways.items()}
    times: dict[tuple[str, int], list[float]] = {(c, t): [] for c in cases for t in args.threads}
    previous = torch.get_num_threads()
    try:
        for threads in args.threads:  # warm-up: page in the data, start the thread pool
            torch.set_num_threads(threads)
            for fn, a, b in cases.values():
                fn(a, b)
        order = list(cases.items())
        for round_ in range(args.repeats):
            for threads in args.threads:
                torch.set_num_threads(threads)
                order[0][1][0](*order[0][1][1:])  # untimed: the first call after a thread change pays for it
                # every other round in reverse, so that no case always runs first or last
                for name, (fn, a, b) in (order if round_ % 2 == 0 else order[::-1]):
                    start = time.perf_counter()
                    fn(a, b)
                    times[(name, threads)].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)

    element_bytes = wl.grads_f[0].element_size()
    rows = []
    print(f"numel {wl.numel:.3g} ({args.model} layout, {len(wl.grads_f)} tensors), {args.dtype}, "
          f"cpu kernel variant {ext.cpu_isa()}, {args.repeats} repeats")
    for (name, threads), ts in times.items():
        median = statistics.median(ts)
        read = wl.numel * element_bytes * (2 if "g_r" in name else 1)
        row = dict(case=name, threads=threads, median_ms=median * 1e3, best_ms=min(ts) * 1e3,
                   gb_per_s=read / median / 1e9, numel=wl.numel, dtype=args.dtype, isa=ext.cpu_isa())
        rows.append(row)
        print(f"  {name:<22} threads={threads}  median {row['median_ms']:7.2f} ms  best {row['best_ms']:7.2f} ms"
              f"  {row['gb_per_s']:5.1f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
