"""GPU readiness without a GPU: compile every kernel specialization ahead of time and inspect it.

    python benchmarks/gpu_readiness.py --out DIR [--triton36 PATH] [--archs 80 90] [--quick]

Triton: the library's own wrappers (``TritonBackend`` gramian, coefficients, combine_, step_)
are driven with CPU tensors over every storage dtype, rule and flag they accept, with the kernel
launch replaced by a recorder. Each recorded launch is turned into Triton's specialisation (the
same binder and argument packing a real launch uses) and compiled with ``triton.compile`` for
each GPU target, once per Triton stack: the Triton importable here and, with ``--triton36``,
triton 3.6.0 from a private folder (the GPU machines' version). Each stack runs in its own
worker process. Registers, spills and static shared memory come from the ptxas log of that very
compile (Triton ships its own ptxas), dynamic shared memory from the compiled metadata, and the
PTX is searched for the 128-bit global loads and stores of the fast paths.

CUDA: ``csrc/cuda_kernels.cu`` (free of torch headers) is compiled by nvcc with the flags of the
extension build plus ``-Xptxas -v`` for each target, against the contract header generated from
``eupmu_kernels.contract`` as the build does; every kernel instantiation is one row.

Writes ``DIR/gpu_readiness.json`` (one row per backend, kernel, specialisation, arch and
toolchain) and ``DIR/gpu_readiness.md`` (summary, failures, occupancy, and a bytes-model
projection of each kernel at 1e8 parameters on H100/H200 peak bandwidth: a model, not a
measurement). Exit status 0 when every row compiled, nothing spills at sm_90 and every fast path
is vectorised; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DEFAULT_ARCHS = (80, 90)
# Per-SM limits used for the occupancy estimate (NVIDIA's published figures for A100 and H100/H200).
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=164 * 1024, reg_unit=256),
    90: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=228 * 1024, reg_unit=256),
}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block from sm_80 on

# constexpr arguments that never vary between launches: left out of the specialisation name
FIXED_CONSTEXPRS = {"BLOCK", "BITS", "LANES", "CLIP_EPS", "ROWS", "ITERATIONS"}


@dataclass
class Row:
    backend: str  # "triton" | "cuda"
    kernel: str
    specialization: str
    arch: str  # "sm_80", "sm_90"
    toolchain: str  # "triton 3.8.0", "triton 3.6.0", "nvcc 13.0"
    compiled: bool
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    spills: int | None = None  # bytes spilled (stores + loads); 0 is the target
    stack_bytes: int | None = None
    shared_bytes: int | None = None  # static (ptxas) + dynamic (Triton metadata)
    threads_per_block: int | None = None
    blocks_per_sm: int | None = None
    occupancy: float | None = None  # resident warps / maximum warps per SM (estimate)
    occupancy_limiter: str | None = None
    ld_global_v4: int | None = None
    st_global_v4: int | None = None
    expected_v4_loads: int | None = None  # of the fast path (None: no fast path)
    expected_v4_stores: int | None = None
    vectorised: bool | None = None
    compile_seconds: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- ptxas


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """{entry: {registers, spill_stores, spill_loads, stack_bytes, smem}} from a ``ptxas -v`` log."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "smem": 0}
            continue
        if current is None:
            continue
        if (m := _PROPS.search(line)) is not None:
            out[current].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        if (m := _USED.search(line)) is not None:
            out[current]["registers"] = int(m.group(1))
            if (s := _SMEM.search(line)) is not None:
                out[current]["smem"] = int(s.group(1))
    return out


_V4 = re.compile(r"\b(ld|st)((?:\.[a-z0-9_:]+)*?)\.v4\.[bfus]32\b")
_NOT_GLOBAL = {"param", "shared", "local", "const"}


def count_v4(ptx: str, global_only: bool = True) -> tuple[int, int]:
    """(128-bit loads, 128-bit stores) of global memory in PTX (``ld.global[.nc].v4.b32`` and the like).

    With ``global_only=False`` generic-space accesses (``ld.v4.f32``) count too: nvcc emits those
    when a pointer comes from a table in memory and cannot be proven global."""
    counts = {"ld": 0, "st": 0}
    for op, quals in _V4.findall(ptx):
        names = set(quals.strip(".").split(".")) if quals else set()
        if names & _NOT_GLOBAL or (global_only and "global" not in names):
            continue
        counts[op] += 1
    return counts["ld"], counts["st"]


def occupancy(arch: int, registers: int, threads: int, shared: int) -> tuple[int, float, str]:
    """(blocks per SM, resident warps / max warps, limiting resource) from registers x threads."""
    lim = SM_LIMITS[arch]
    warps = max(1, math.ceil(threads / 32))
    regs_per_warp = math.ceil(max(registers, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "threads": lim["threads"] // (warps * 32),
        "blocks": lim["blocks"],
        "shared memory": lim["smem"] // (shared + SMEM_RESERVED_PER_BLOCK),
    }
    limiter = min(by, key=lambda k: by[k])
    blocks = by[limiter]
    return blocks, blocks * warps / lim["warps"], limiter


def with_occupancy(row: Row, arch: int) -> Row:
    if row.compiled and row.registers is not None and row.threads_per_block:
        row.blocks_per_sm, row.occupancy, row.occupancy_limiter = occupancy(
            arch, row.registers, row.threads_per_block, row.shared_bytes or 0)
    if row.ld_global_v4 is not None and row.expected_v4_loads is not None:
        row.vectorised = (row.ld_global_v4 >= row.expected_v4_loads
                          and (row.st_global_v4 or 0) >= (row.expected_v4_stores or 0))
    return row


# ---------------------------------------------------------------------------------------- Triton worker


def _record_launches() -> list[tuple[Any, tuple, dict]]:
    """Every launch the Triton backend makes over its dtypes, rules and flags (kernels not run)."""
    import dataclasses

    import torch
    from triton.runtime.jit import JITFunction

    from eupmu_kernels.contract import RuleStateLists, StepHyper, SurgeryConfig, surgery_codes
    from eupmu_kernels.backends.triton_backend import TritonBackend

    launches: list[tuple[Any, tuple, dict]] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs)))

    backend = TritonBackend()
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    shapes = [(7,), (4096 + 5,)]  # a masked block, a full (fast) block and a tail

    def tensors(dtype):
        return [torch.ones(s, dtype=dtype) for s in shapes]

    JITFunction.run = record
    try:
        for dtype in dtypes:
            for has_b in (True, False):
                backend.gramian(tensors(dtype), tensors(dtype) if has_b else None)
        gram = torch.ones(3, dtype=torch.float64)
        for method in surgery_codes():
            for inv in (None, torch.tensor(0.5)):
                for found_inf in (None, torch.zeros(1)):
                    for max_norm in (None, 1.0):
                        backend.coefficients(gram, SurgeryConfig(method=method, max_norm=max_norm), inv, found_inf)
        coef = torch.zeros(8, dtype=torch.float32)
        for dtype in dtypes:
            for has_r in (True, False):
                backend.combine_(tensors(dtype), tensors(dtype) if has_r else None, coef)
        rules = [("sgd", StepHyper(lr=0.1)), ("sgd", StepHyper(lr=0.1, momentum=0.9)),
                 ("adam", StepHyper(lr=0.1)), ("adamw", StepHyper(lr=0.1, weight_decay=0.1))]
        for dtype in dtypes:
            state_dtypes = {dtype, torch.float32}
            for rule, hp in rules:
                for state_dtype in state_dtypes:
                    for has_r in (True, False):
                        st = RuleStateLists(step=[torch.zeros((), dtype=torch.float32) for _ in shapes])
                        if rule == "sgd":
                            st.momentum_buffer = tensors(state_dtype) if hp.momentum else []
                        else:
                            st.exp_avg, st.exp_avg_sq = tensors(state_dtype), tensors(state_dtype)
                        backend.step_(rule, tensors(dtype), tensors(dtype), tensors(dtype) if has_r else None, st,
                                      coef, hp)
        # update-space surgery: the reduction pass, its coefficients, Adam's uncorrected-denominator step
        update_rules = [("sgd", StepHyper(lr=0.1)), ("sgd", StepHyper(lr=0.1, momentum=0.9)),
                        ("sgd", StepHyper(lr=0.1, momentum=0.9, nesterov=True)), ("adam", StepHyper(lr=0.1)),
                        ("adamw", StepHyper(lr=0.1, weight_decay=0.1))]
        for dtype in dtypes:
            for rule, hp in update_rules:
                hp = dataclasses.replace(hp, uncorrected_preconditioner=True)
                for state_dtype in {dtype, torch.float32}:
                    st = RuleStateLists(step=[torch.zeros((), dtype=torch.float32) for _ in shapes])
                    if rule == "sgd":
                        st.momentum_buffer = tensors(state_dtype) if hp.momentum else []
                    else:
                        st.exp_avg, st.exp_avg_sq = tensors(state_dtype), tensors(state_dtype)
                    backend.update_terms(rule, tensors(dtype), tensors(dtype), tensors(dtype), st, hp)
                    if rule != "sgd":
                        backend.step_(rule, tensors(dtype), tensors(dtype), tensors(dtype), st, coef, hp)
        terms = torch.ones(7, dtype=torch.float64)
        for found_inf in (None, torch.zeros(1)):
            for max_norm in (None, 1.0):
                backend.update_space_coefficients(terms, SurgeryConfig(max_norm=max_norm), 0.0, found_inf)
    finally:
        JITFunction.run = original
    return launches


def _rule_code(name: str) -> int:
    from eupmu_kernels.contract import rule_codes

    return rule_codes()[name]


def _dtype_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name) if name is not None else str(value)


def _specialization_name(fn, constexprs: dict, num_warps: int) -> str:
    names = [p.name for p in fn.params]
    parts = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]] if isinstance(path, tuple) else str(path)
        if name in FIXED_CONSTEXPRS:
            continue
        parts.append(f"{name}={_dtype_name(value)}")
    parts.append(f"warps={num_warps}")
    return ",".join(parts)


# Arrays each kernel's fast path reads and writes: (role, dtype constexpr or "state"/"param").
def _fast_path_arrays(kernel: str, flags: dict[str, Any]) -> tuple[list[str], list[str]] | None:
    """(dtype constexpr names of the arrays read, of the arrays written) on the fast path."""
    if kernel == "_gramian_blocks_kernel":
        return (["DTYPE"] * (2 if flags["HAS_B"] else 1), [])
    if kernel == "_combine_kernel":
        return (["G_DTYPE"] * (2 if flags["HAS_R"] else 1), ["G_DTYPE"])
    if kernel == "_sgd_kernel":
        reads = ["P_DTYPE"] * (3 if flags["HAS_R"] else 2) + (["S_DTYPE"] if flags["HAS_MOMENTUM"] else [])
        writes = ["P_DTYPE"] + (["S_DTYPE"] if flags["HAS_MOMENTUM"] else [])
        return reads, writes
    if kernel == "_adam_kernel":
        reads = ["P_DTYPE"] * (3 if flags["HAS_R"] else 2) + ["S_DTYPE", "S_DTYPE"]
        return reads, ["P_DTYPE", "S_DTYPE", "S_DTYPE"]
    if kernel == "_terms_blocks_kernel":  # p, g_f, g_r and the state; nothing written
        states = 2 if flags["RULE"] != _rule_code("sgd") else (1 if flags["HAS_S1"] else 0)
        return ["P_DTYPE"] * 3 + ["S_DTYPE"] * states, []
    return None


def _expected_v4(kernel: str, flags: dict[str, Any], num_warps: int) -> tuple[int | None, int | None]:
    """128-bit accesses per thread the design asks of the fast path: BLOCK * size / 16 / threads per array."""
    arrays = _fast_path_arrays(kernel, flags)
    if arrays is None or "BLOCK" not in flags:
        return None, None
    threads = 32 * num_warps

    def per_array(dtype_flag: str) -> int:
        size = flags[dtype_flag].primitive_bitwidth // 8
        return max(1, flags["BLOCK"] * size // 16 // threads)

    return sum(per_array(a) for a in arrays[0]), sum(per_array(a) for a in arrays[1])


def _compile_one(fn, args: tuple, kwargs: dict, capability: int):
    """Compile one recorded launch for ``capability`` exactly as JITFunction.run would."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), constexprs, options


def specializations() -> list[tuple[Any, tuple, dict, dict, int, str]]:
    """Distinct (kernel, args, kwargs, constexpr flags, num_warps, name) of the recorded launches."""
    seen: set = set()
    out = []
    for fn, args, kwargs in _record_launches():
        names = [p.name for p in fn.params]
        flags = {n: kwargs[n] for n in names if n in kwargs and fn.params[names.index(n)].is_constexpr}
        num_warps = int(kwargs.get("num_warps", 4))
        key = (fn.__name__, tuple(sorted((k, _dtype_name(v)) for k, v in flags.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        spec = _specialization_name(fn, {(names.index(k),): v for k, v in flags.items()}, num_warps)
        out.append((fn, args, kwargs, flags, num_warps, spec))
    return out


def triton_worker(archs: list[int], quick: bool) -> list[Row]:
    import triton
    from triton import knobs

    toolchain = f"triton {triton.__version__}"
    rows: list[Row] = []
    knobs.nvidia.dump_ptxas_log = True
    for fn, args, kwargs, flags, num_warps, spec in specializations():
        if quick and not _in_quick_set(fn.__name__, flags):
            continue
        for capability in archs:
            arch = f"sm_{capability}"
            row = Row(backend="triton", kernel=fn.__name__, specialization=spec, arch=arch, toolchain=toolchain,
                      compiled=False, threads_per_block=32 * num_warps)
            row.expected_v4_loads, row.expected_v4_stores = _expected_v4(fn.__name__, flags, num_warps)
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    compiled, _, _ = _compile_one(fn, args, kwargs, capability)
            except Exception as exc:  # a failing specialisation is a result, not a crash
                row.error = f"{type(exc).__name__}: {exc}"[:2000]
                row.compile_seconds = time.perf_counter() - start
                rows.append(row)
                continue
            row.compile_seconds = round(time.perf_counter() - start, 3)
            row.compiled = True
            ptx = compiled.asm.get("ptx", "")
            row.ld_global_v4, row.st_global_v4 = count_v4(ptx)
            stats = parse_ptxas_log(log.getvalue()).get(fn.__name__)
            metadata = compiled.metadata
            dynamic_shared = int(getattr(metadata, "shared", 0) or 0)
            if stats is not None:
                row.registers = stats["registers"]
                row.spill_stores, row.spill_loads = stats["spill_stores"], stats["spill_loads"]
                row.spills = row.spill_stores + row.spill_loads
                row.stack_bytes = stats["stack_bytes"]
                row.shared_bytes = stats["smem"] + dynamic_shared
            else:
                row.error = "compiled, but the ptxas log had no entry for this kernel"
                row.shared_bytes = dynamic_shared
            row.extra = {"ptx_lines": ptx.count("\n"), "target": getattr(metadata, "target", None) and
                         str(metadata.target)}
            rows.append(with_occupancy(row, capability))
    return rows


# the reduced set compiled inside the test suite: every kernel, the widest flags, each storage width
QUICK = {
    "_gramian_blocks_kernel": lambda f: f["HAS_B"] and _dtype_name(f["DTYPE"]) in ("fp32", "bf16"),
    "_gramian_finish_kernel": lambda f: f["HAS_B"],
    "_coefficients_kernel": lambda f: f["HAS_INV"] and f["HAS_FOUND_INF"] and f["HAS_CLIP"],
    "_advance_steps_kernel": lambda f: True,
    "_combine_kernel": lambda f: f["HAS_R"] and _dtype_name(f["G_DTYPE"]) == "fp16",
    "_sgd_kernel": lambda f: f["HAS_R"] and f["HAS_MOMENTUM"] and _dtype_name(f["P_DTYPE"]) == "bf16"
    and _dtype_name(f["S_DTYPE"]) == "fp32",
    "_adam_kernel": lambda f: f["HAS_R"] and f["DECOUPLED"] and _dtype_name(f["P_DTYPE"]) == _dtype_name(f["S_DTYPE"])
    and f["UNCORRECTED"] == (_dtype_name(f["P_DTYPE"]) == "bf16"),
    "_terms_blocks_kernel": lambda f: _dtype_name(f["S_DTYPE"]) == "fp32" and (
        (f["RULE"] == _rule_code("adam") and _dtype_name(f["P_DTYPE"]) == "bf16")
        or (f["RULE"] == _rule_code("sgd") and f["HAS_S1"] and not f["NESTEROV"]
            and _dtype_name(f["P_DTYPE"]) == "fp32")),
    "_update_space_coefficients_kernel": lambda f: f["HAS_FOUND_INF"] and f["HAS_CLIP"],
}


def _in_quick_set(kernel: str, flags: dict) -> bool:
    select = QUICK.get(kernel)
    return select is None or bool(select(flags))


# ---------------------------------------------------------------------------------------- CUDA (nvcc)


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _build_config():
    """csrc/build_ext_config.py, the extension build's description."""
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    try:
        import build_ext_config  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return build_ext_config


def _nvcc_flags() -> list[str]:
    """The extension build's nvcc flags (csrc/build_ext_config.py plus torch's common flags), with
    the CUDA part switched on as in a CUDA build."""
    flags = list(_build_config().NVCC_FLAGS) + ["-DEUPMU_WITH_CUDA=1"]
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        flags += [f for f in COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"] + ["--expt-relaxed-constexpr"]
    except Exception:  # torch absent: the kernels file needs none of it
        pass
    return flags + ["-std=c++17"]


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_ptx_entries(ptx: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    matches = list(re.finditer(r"\.entry\s+([A-Za-z0-9_$]+)\s*\(", ptx))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(ptx)
        parts[m.group(1)] = ptx[m.start():end]
    return parts


_UPDATE_KINDS = {"0": "kAdam", "1": "kSgdMomentum", "2": "kSgdPlain"}  # cuda_kernels.h, UpdateKind


def _kernel_and_template_args(demangled: str) -> tuple[str, str]:
    """("update_chunks_kernel", "float, float, kAdam, true") from a demangled kernel signature."""
    text = re.sub(r"^void\s+", "", demangled)
    text = re.sub(r"eupmu::cuda::|\(anonymous namespace\)::|eupmu::", "", text)
    head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text)
    name = head.group(0) if head else text
    rest = text[len(name):]
    if not rest.startswith("<"):
        return name, "-"
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0:
            args = rest[1:i]
            break
    else:
        args = rest[1:]
    args = re.sub(r"\(UpdateKind\)(\d)", lambda m: _UPDATE_KINDS.get(m.group(1), m.group(0)), args)
    return name, args.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


CUDA_THREADS = {"gram_chunks_kernel": 512, "gram_cleanup_kernel": 256, "coefficients_kernel": 1,
                "combine_chunks_kernel": 512, "update_chunks_kernel": 512, "advance_steps_kernel": 64,
                "terms_chunks_kernel": 512, "terms_cleanup_kernel": 256, "update_space_coefficients_kernel": 1}


def _cuda_expected_v4(kernel: str, spec: str) -> tuple[int | None, int | None]:
    """16-byte accesses the aligned path needs at least: one per array read and per array written."""
    args = [a.strip() for a in spec.split(",")]
    if kernel == "gram_chunks_kernel":
        return 1 + (args[-1] == "true"), 0
    if kernel == "combine_chunks_kernel":
        return 1 + (args[-1] == "true"), 1
    if kernel == "update_chunks_kernel":
        kind, has_gr = args[2], args[3] == "true"
        states = {"kAdam": 2, "kSgdMomentum": 1, "kSgdPlain": 0}[kind]
        return 2 + has_gr + states, 1 + states
    return None, None


def cuda_rows(archs: list[int], workdir: str) -> list[Row]:
    nvcc = _find_nvcc()
    source = os.path.join(REPO, "csrc", "cuda_kernels.cu")
    if nvcc is None:
        return [Row(backend="cuda", kernel="*", specialization="*", arch=f"sm_{a}", toolchain="nvcc",
                    compiled=False, error="nvcc not found (set CUDA_HOME)") for a in archs]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", version)
    toolchain = f"nvcc {m.group(1) if m else '?'}"
    rows: list[Row] = []
    try:  # the contract header, generated as the build does (never from a copy in the tree)
        generated = _build_config().write_contract_header(REPO, os.path.join(workdir, "generated"))
    except Exception as err:  # reported as failed rows
        return [Row(backend="cuda", kernel="*", specialization="*", arch=f"sm_{a}", toolchain=toolchain,
                    compiled=False, error=f"eupmu_contract.h: {err}") for a in archs]
    for capability in archs:
        arch = f"sm_{capability}"
        base = [nvcc, *_nvcc_flags(), f"-I{os.path.join(REPO, 'csrc')}", f"-I{generated}", f"-arch={arch}", source]
        start = time.perf_counter()
        cubin = os.path.join(workdir, f"cuda_kernels_{arch}.cubin")
        res = subprocess.run(base + ["-cubin", "-Xptxas", "-v", "-o", cubin], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if res.returncode != 0:
            rows.append(Row(backend="cuda", kernel="cuda_kernels.cu", specialization="*", arch=arch,
                            toolchain=toolchain, compiled=False, error=(res.stderr or res.stdout)[-2000:],
                            compile_seconds=round(seconds, 1)))
            continue
        ptx_path = os.path.join(workdir, f"cuda_kernels_{arch}.ptx")
        ptx_res = subprocess.run(base + ["-ptx", "-o", ptx_path], capture_output=True, text=True)
        entries = _split_ptx_entries(open(ptx_path).read()) if ptx_res.returncode == 0 else {}
        stats = parse_ptxas_log(res.stdout + res.stderr)
        pretty = _demangle(list(stats))
        for mangled, st in sorted(stats.items(), key=lambda kv: pretty[kv[0]]):
            kernel, spec = _kernel_and_template_args(pretty[mangled])
            row = Row(backend="cuda", kernel=kernel, specialization=spec, arch=arch, toolchain=toolchain,
                      compiled=True, registers=st["registers"], spill_stores=st["spill_stores"],
                      spill_loads=st["spill_loads"], spills=st["spill_stores"] + st["spill_loads"],
                      stack_bytes=st["stack_bytes"], shared_bytes=st["smem"],
                      threads_per_block=CUDA_THREADS.get(kernel), compile_seconds=round(seconds, 1))
            if mangled in entries:
                # pointers from the launch arguments: nvcc's 16-byte accesses are generic-space (ld.v4, st.v4)
                row.ld_global_v4, row.st_global_v4 = count_v4(entries[mangled], global_only=False)
                row.expected_v4_loads, row.expected_v4_stores = _cuda_expected_v4(kernel, spec)
            row.extra = {"mangled": mangled}
            rows.append(with_occupancy(row, capability))
    return rows


# ---------------------------------------------------------------------------------------- bytes model


def bytes_projection(numel: float = 1e8) -> list[dict]:
    """Per-kernel bytes at ``numel`` parameters and the time they take at peak HBM bandwidth (a model)."""
    sys.path.insert(0, HERE)  # the folder that holds the eupmu_bench package
    try:
        from eupmu_bench.bytes_model import StorageSizes
    finally:
        sys.path.pop(0)
    layouts = {"fp32": StorageSizes(4, 4, 4), "bf16 params, fp32 state": StorageSizes(2, 2, 4),
               "bf16 everything": StorageSizes(2, 2, 2)}
    kernels = {
        "gramian (g_f, g_r)": lambda s: 2 * s.grad,
        "gramian (g) / clip norm": lambda s: s.grad,
        "combine g_f += lambda g_r": lambda s: 3 * s.grad,
        "adam/adamw step with g_r": lambda s: 2 * s.param + 2 * s.grad + 4 * s.state,
        "adam/adamw step (one gradient)": lambda s: 2 * s.param + s.grad + 4 * s.state,
        "sgd momentum step with g_r": lambda s: 2 * s.param + 2 * s.grad + 2 * s.state,
        "sgd step with g_r": lambda s: 2 * s.param + 2 * s.grad,
        "explicit surgery + adamw (gramian + step)": lambda s: 4 * s.grad + 2 * s.param + 4 * s.state,
    }
    peaks = {"H100 3.35 TB/s": 3.35e12, "H200 4.8 TB/s": 4.8e12}
    rows = []
    for layout, sizes in layouts.items():
        for name, per_param in kernels.items():
            b = per_param(sizes)
            rows.append({"kernel": name, "layout": layout, "bytes_per_param": b, "numel": numel,
                         **{f"model_us_{k.split()[0]}": b * numel / bw * 1e6 for k, bw in peaks.items()}})
    return rows


# ---------------------------------------------------------------------------------------- report


def _fmt(x, digits=0):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_report(rows: list[Row], out_dir: str, meta: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    dict_rows = [asdict(r) for r in rows]
    projection = bytes_projection()
    summary = summarize(rows)
    with open(os.path.join(out_dir, "gpu_readiness.json"), "w") as fh:
        json.dump({"meta": meta, "summary": summary, "rows": dict_rows, "bytes_model_projection": projection},
                  fh, indent=1, default=str)
    lines = ["# GPU readiness (compiled ahead of time, no GPU)\n",
             f"date {meta['date']}, machine: {meta['machine']}, command: `{meta['command']}`\n",
             "No GPU was used: every number below comes from compilers (Triton, ptxas, nvcc), "
             "not from running a kernel.\n",
             "## Summary\n", "| backend | toolchain | arch | rows | compiled | max registers | spills (bytes) | "
             "fast paths vectorised |", "|---|---|---|---|---|---|---|---|"]
    for _, s in sorted(summary["groups"].items()):
        lines.append(f"| {s['backend']} | {s['toolchain']} | {s['arch']} | {s['rows']} | {s['compiled']} | "
                     f"{s['max_registers']} | {s['spill_bytes']} | {s['vectorised']}/{s['vector_checked']} |")
    failed = [r for r in rows if not r.compiled]
    lines += ["", f"Rows: {summary['rows']} ({summary['triton_rows']} Triton, {summary['cuda_rows']} CUDA); "
              f"failed: {len(failed)}; rows with spills: {summary['rows_with_spills']}; fast paths not "
              f"vectorised: {summary['not_vectorised']}.", ""]
    if failed:
        lines += ["## Failures\n", "| backend | kernel | specialization | arch | toolchain | error |",
                  "|---|---|---|---|---|---|"]
        for r in failed:
            err = (r.error or "").replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {r.backend} | {r.kernel} | {r.specialization} | {r.arch} | {r.toolchain} | {err} |")
        lines.append("")
    lines += ["## Per kernel (worst case over its specialisations)\n",
              "| backend | kernel | arch | toolchain | specs | registers (max) | spills | threads/block | "
              "occupancy (min) | v4 ld/st (fast path, min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, s in sorted(summary["kernels"].items()):
        lines.append(f"| {s['backend']} | {s['kernel']} | {s['arch']} | {s['toolchain']} | {s['specs']} | "
                     f"{s['max_registers']} | {s['spill_bytes']} | {s['threads']} | {_fmt(s['min_occupancy'], 2)} | "
                     f"{s['v4']} |")
    lines += ["", "## Bytes model at 1e8 parameters (a model, not a measurement)\n",
              "Time = bytes moved / peak HBM bandwidth. Launch latency (a few microseconds per launch) and "
              "the tiny coefficient kernels are not modelled. Measured copy bandwidth is below peak "
              "(about 3.0 TB/s on H100 and 4.3 TB/s on H200), so a kernel at 80% of the measured copy "
              "bandwidth takes about 1.4x these times on either card.\n",
              "| kernel | layout | bytes/param | H100 3.35 TB/s (us) | H200 4.8 TB/s (us) |", "|---|---|---|---|---|"]
    for p in projection:
        lines.append(f"| {p['kernel']} | {p['layout']} | {p['bytes_per_param']} | {p['model_us_H100']:.0f} | "
                     f"{p['model_us_H200']:.0f} |")
    with open(os.path.join(out_dir, "gpu_readiness.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return summary


def summarize(rows: list[Row]) -> dict:
    groups: dict[str, dict] = {}
    kernels: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(f"{r.backend}|{r.toolchain}|{r.arch}", dict(
            backend=r.backend, toolchain=r.toolchain, arch=r.arch, rows=0, compiled=0, max_registers=0,
            spill_bytes=0, vectorised=0, vector_checked=0))
        k = kernels.setdefault(f"{r.backend}|{r.kernel}|{r.arch}|{r.toolchain}", dict(
            backend=r.backend, kernel=r.kernel, arch=r.arch, toolchain=r.toolchain, specs=0, max_registers=0,
            spill_bytes=0, threads=r.threads_per_block, min_occupancy=None, v4="-"))
        g["rows"] += 1
        k["specs"] += 1
        if r.compiled:
            g["compiled"] += 1
            g["max_registers"] = max(g["max_registers"], r.registers or 0)
            g["spill_bytes"] += r.spills or 0
            k["max_registers"] = max(k["max_registers"], r.registers or 0)
            k["spill_bytes"] += r.spills or 0
            if r.occupancy is not None:
                k["min_occupancy"] = r.occupancy if k["min_occupancy"] is None else min(k["min_occupancy"],
                                                                                       r.occupancy)
        if r.vectorised is not None:
            g["vector_checked"] += 1
            g["vectorised"] += int(r.vectorised)
            v4 = f"{r.ld_global_v4}/{r.st_global_v4}"
            k["v4"] = v4 if k["v4"] == "-" else min(k["v4"], v4, key=lambda s: tuple(int(x) for x in s.split("/")))
    return {
        "rows": len(rows),
        "triton_rows": sum(r.backend == "triton" for r in rows),
        "cuda_rows": sum(r.backend == "cuda" for r in rows),
        "compiled": sum(r.compiled for r in rows),
        "rows_with_spills": sum(bool(r.spills) for r in rows),
        "not_vectorised": sum(r.vectorised is False for r in rows),
        "toolchains": sorted({r.toolchain for r in rows}),
        "groups": groups,
        "kernels": kernels,
    }


# ---------------------------------------------------------------------------------------- orchestration


def _run_worker(label: str, path: str | None, archs: list[int], quick: bool, workdir: str) -> tuple[list[Row], str]:
    out = os.path.join(workdir, f"rows_{label}.json")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = os.path.join(workdir, f"triton_cache_{label}")  # a fresh cache: real compiles
    env["PYTHONPATH"] = os.pathsep.join([p for p in (path, REPO, env.get("PYTHONPATH")) if p])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--worker-out", out,
           "--archs", *map(str, archs)] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0 or not os.path.exists(out):
        return [Row(backend="triton", kernel="*", specialization="*", arch=f"sm_{a}", toolchain=f"triton ({label})",
                    compiled=False, error=f"worker failed (rc={res.returncode}): {log[-1500:]}") for a in archs], log
    with open(out) as fh:
        return [Row(**r) for r in json.load(fh)], log


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (gpu_readiness.json, gpu_readiness.md)")
    parser.add_argument("--triton36", default=os.environ.get("EUPMU_TRITON36"),
                        help="folder holding triton 3.6.0 (pip install --target); skipped when absent")
    parser.add_argument("--archs", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--quick", action="store_true", help="a reduced set of specialisations (for the tests)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of csrc/cuda_kernels.cu")
    parser.add_argument("--jobs", type=int, default=2, help="Triton stacks compiled in parallel")
    parser.add_argument("--list", action="store_true",
                        help="print the Triton specialisations the library can launch (JSON) and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("--list needs the compiling Triton: unset TRITON_INTERPRET")
        import triton

        listing = [{"kernel": fn.__name__, "specialization": spec} for fn, _, _, _, _, spec in specializations()]
        print(json.dumps({"triton": triton.__version__, "specializations": listing}, indent=1))
        return 0
    if args.worker:
        rows = triton_worker(args.archs, args.quick)
        with open(args.worker_out, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, default=str)
        return 0

    if not args.out:
        parser.error("--out is required")
    start = time.perf_counter()
    stacks: list[tuple[str, str | None]] = [("dev", None)]
    if args.triton36:
        if os.path.isdir(os.path.join(args.triton36, "triton")):
            stacks.append(("3.6", args.triton36))
        else:
            print(f"--triton36 {args.triton36}: no triton package there", file=sys.stderr)
            return 2
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="eupmu-readiness-") as workdir:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(_run_worker, label, path, args.archs, args.quick, workdir) for label, path in stacks]
            cuda = [] if args.no_cuda else cuda_rows(args.archs, workdir)
            for (label, _), fut in zip(stacks, futures):
                worker_rows, log = fut.result()
                rows += worker_rows
                if any(not r.compiled for r in worker_rows):
                    print(f"[{label}] worker log tail:\n{log[-3000:]}", file=sys.stderr)
        rows += cuda
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
            "command": " ".join(["python benchmarks/gpu_readiness.py"] + (argv if argv is not None else sys.argv[1:])),
            "python": platform.python_version(), "seconds": round(time.perf_counter() - start, 1),
            "quick": args.quick, "archs": args.archs}
    summary = write_report(rows, args.out, meta)
    print(f"{summary['rows']} rows ({summary['triton_rows']} Triton, {summary['cuda_rows']} CUDA), "
          f"{summary['compiled']} compiled, {summary['rows_with_spills']} with spills, "
          f"{summary['not_vectorised']} fast paths not vectorised, toolchains {summary['toolchains']}, "
          f"{meta['seconds']} s -> {os.path.join(args.out, 'gpu_readiness.md')}")
    spills_sm90 = sum(bool(r.spills) for r in rows if r.arch == "sm_90")
    ok = summary["compiled"] == summary["rows"] and spills_sm90 == 0 and summary["not_vectorised"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
