"""Build description of the compiled extension ``eupmu_kernels._C`` (imported by setup.py).

What is built (see setup.py for the environment variables):

* the C++ CPU kernels (``csrc/*.cpp`` except ``cuda_*``) as a ``CppExtension`` whenever torch
  and a C++ compiler are present, CPU-only torch included;
* plus the CUDA kernels (``csrc/cuda_*``) as a ``CUDAExtension`` when torch is a CUDA build and
  nvcc is found; the module then defines ``EUPMU_WITH_CUDA`` and ``_C.has_cuda_kernels()`` is true.

The coefficient slots and rule codes (``eupmu_contract.h``) are generated from
``eupmu_kernels/contract.py`` into ``build/eupmu_generated/`` (on the include path), never into
the source tree or site-packages.

EUPMU_CUDA_ARCHS  compute capabilities, separated by ';', ',' or spaces (default "8.0;9.0");
                  "9.0a" selects the arch-specific target, "+PTX" on one also embeds its PTX.
                  The highest listed arch always embeds PTX, so newer GPUs can JIT it.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

DEFAULT_ARCHS = "8.0;9.0"
EXTENSION_NAME = "eupmu_kernels._C"

CXX_FLAGS = [
    "-O3",
    "-fopenmp",  # at::parallel_for is a header template; without OpenMP it runs on one thread
    "-fno-math-errno",  # lets sqrt vectorise
    "-fno-trapping-math",  # lets selects in the loops be if-converted, hence vectorised
    "-ffp-contract=off",  # the float16 rounding trick needs unfused products and sums
    "-Wno-psabi",  # wide vector types in always-inline helpers: no ABI is crossed
]
NVCC_FLAGS = ["-O3"]

_ARCH_PATTERN = re.compile(r"^(\d+)\.(\d+)(a?)(\+PTX)?$")


def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """[(number like "90" or "90a", embed PTX)] from an EUPMU_CUDA_ARCHS value."""
    archs: list[tuple[str, bool]] = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = _ARCH_PATTERN.match(item)
        if match is None:
            raise ValueError(f"EUPMU_CUDA_ARCHS: cannot read {item!r} (expected e.g. 8.0, 9.0, 9.0a or 9.0+PTX)")
        major, minor, suffix, ptx = match.groups()
        archs.append((f"{major}{minor}{suffix}", bool(ptx)))
    if not archs:
        raise ValueError("EUPMU_CUDA_ARCHS is empty")
    return archs


def gencode_flags(spec: str) -> list[str]:
    archs = parse_archs(spec)
    highest = max(archs, key=lambda a: int(a[0].rstrip("a")))[0]
    flags = []
    for number, ptx in archs:
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx or number == highest:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _wheel_cuda_dirs(subdir: str) -> list[str]:
    """Folders of the nvidia-* pip wheels (CUDA 13 layout), e.g. headers missing from a toolkit."""
    try:
        module = importlib.import_module("nvidia.cu13")
    except ImportError:
        return []
    return [os.path.join(p, subdir) for p in module.__path__ if os.path.isdir(os.path.join(p, subdir))]


def _toolkit_lib_dirs(cuda_home: str) -> list[str]:
    candidates = ["lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                  os.path.join("targets", "sbsa-linux", "lib")]
    return [os.path.join(cuda_home, c) for c in candidates if os.path.isdir(os.path.join(cuda_home, c))]


def _cudart_link_dir(root: str) -> list[str]:
    """A build-local folder with a libcudart.so symlink when the toolkit only has libcudart.so.N.

    The linker looks for the unversioned name; some toolkits (and the pip wheels) ship only the
    versioned one. The symlink lives under build/, never in the source tree.
    """
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    lib_dirs = _toolkit_lib_dirs(cuda_home)
    if any(os.path.exists(os.path.join(d, "libcudart.so")) for d in lib_dirs):
        return []
    for folder in lib_dirs + _wheel_cuda_dirs("lib"):
        versioned = sorted(glob.glob(os.path.join(folder, "libcudart.so.*")))
        if versioned:
            link_dir = os.path.join(root, "build", "eupmu_cudart_link")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(versioned[0], link)
            return [link_dir]
    return []


# --------------------------------------------------------------------------- what to build

MODES = ("auto", "0", "1")


@dataclass(frozen=True)
class Toolchain:
    """What the build machine offers (probe() fills it in; tests make their own)."""

    torch_version: str | None  # None: torch does not import
    torch_cuda: str | None  # torch.version.cuda (None for a CPU-only torch)
    cxx: str | None  # the C++ compiler found, or None
    cuda_home: str | None  # a CUDA toolkit with bin/nvcc, or None


@dataclass(frozen=True)
class BuildPlan:
    extension: bool  # build eupmu_kernels._C at all
    cuda: bool  # with its CUDA kernels
    notes: list[str] = field(default_factory=list)  # why a part is left out (printed by setup.py)
    error: str | None = None  # a part that was required (mode "1") cannot be built


def read_mode(name: str, environ=os.environ) -> str:
    mode = environ.get(name, "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{name} must be auto, 0 or 1, got {mode!r}")
    return mode


def plan_build(ext_mode: str, cuda_mode: str, tools: Toolchain) -> BuildPlan:
    """Which parts to build, from EUPMU_BUILD_EXT and EUPMU_BUILD_CUDA (auto|0|1) and the toolchain.

    EUPMU_BUILD_CUDA=1 asks for the extension too; EUPMU_BUILD_EXT=0 with EUPMU_BUILD_CUDA=1 is
    a contradiction (an error)."""
    if ext_mode == "0":
        if cuda_mode == "1":
            return BuildPlan(False, False, error="EUPMU_BUILD_CUDA=1 asks for the extension's CUDA kernels "
                                                 "but EUPMU_BUILD_EXT=0 turns the extension off")
        return BuildPlan(False, False, notes=["the compiled extension is turned off (EUPMU_BUILD_EXT=0)"])
    required = ext_mode == "1" or cuda_mode == "1"
    why_not = None
    if tools.torch_version is None:
        why_not = "torch is not installed (install it first and use --no-build-isolation)"
    elif tools.cxx is None:
        why_not = "no C++ compiler was found (set CXX)"
    if why_not is not None:
        which = "EUPMU_BUILD_EXT=1" if ext_mode == "1" else "EUPMU_BUILD_CUDA=1"
        if required:
            return BuildPlan(False, False, error=f"{which} but the extension cannot be built: {why_not}")
        return BuildPlan(False, False, notes=[f"skipping the compiled extension ({why_not})"])
    if cuda_mode == "0":
        return BuildPlan(True, False, notes=["C++ CPU kernels only (EUPMU_BUILD_CUDA=0)"])
    why_not = None
    if tools.torch_cuda is None:
        why_not = f"torch {tools.torch_version} is not a CUDA build"
    elif tools.cuda_home is None:
        why_not = "nvcc was not found (set CUDA_HOME)"
    if why_not is not None:
        if cuda_mode == "1":
            return BuildPlan(False, False, error=f"EUPMU_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        return BuildPlan(True, False, notes=[f"C++ CPU kernels only: {why_not}"])
    return BuildPlan(True, True)


def find_cuda_home(environ=os.environ) -> str | None:
    """A CUDA toolkit with bin/nvcc. torch's own guess can land on a wrapper script in
    /usr/local/bin; prefer CUDA_HOME, CUDA_PATH, then the usual folder, then nvcc on PATH."""
    for candidate in (environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def find_cxx(environ=os.environ) -> str | None:
    """The C++ compiler torch.utils.cpp_extension will call (CXX, else c++), if it exists."""
    words = environ.get("CXX", "c++").split()
    return shutil.which(words[0]) if words else None


def probe(environ=os.environ) -> Toolchain:
    try:
        import torch
    except ImportError:
        return Toolchain(None, None, find_cxx(environ), find_cuda_home(environ))
    return Toolchain(torch.__version__, torch.version.cuda, find_cxx(environ), find_cuda_home(environ))


# --------------------------------------------------------------------------- the generated header

CONTRACT_HEADER = "eupmu_contract.h"


def generated_include_dir(root: str) -> str:
    return os.path.join(root, "build", "eupmu_generated")


def write_contract_header(root: str, out_dir: str | None = None) -> str:
    """Writes eupmu_contract.h (eupmu_kernels.contract.c_header() of the sources under ``root``)
    into ``out_dir`` (default: build/eupmu_generated under root) and returns that folder. The file
    is rewritten only when its text changes, so an unchanged contract rebuilds nothing."""
    out_dir = out_dir or generated_include_dir(root)
    code = "import sys; from eupmu_kernels.contract import c_header; sys.stdout.write(c_header())"
    # a fresh interpreter in root: it imports this checkout's package, never an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"generating {CONTRACT_HEADER} failed:\n{done.stderr}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CONTRACT_HEADER)
    old = open(path).read() if os.path.exists(path) else None
    if old != done.stdout:
        with open(path, "w") as fh:
            fh.write(done.stdout)
    return out_dir


# --------------------------------------------------------------------------- the extension


def is_cuda_source(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("cuda_") or name.endswith(".cu")


def sources(root: str, cuda: bool) -> list[str]:
    """Source files relative to root: every csrc/*.cpp, plus the CUDA ones (cuda_*, *.cu) when cuda."""
    csrc = os.path.join(root, "csrc")
    paths = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    return [os.path.relpath(p, root) for p in paths if cuda or not is_cuda_source(p)]


def make_extension(root: str, cuda: bool):
    """The extension: a CppExtension (C++ CPU kernels), or a CUDAExtension with the CUDA kernels
    too. With cuda, CUDA_HOME must be set before torch.utils.cpp_extension is imported. The build
    command writes the generated header (write_contract_header) before it compiles."""
    include_dirs = [os.path.join(root, "csrc"), generated_include_dir(root)]
    if not cuda:
        from torch.utils.cpp_extension import CppExtension

        return CppExtension(name=EXTENSION_NAME, sources=sources(root, cuda=False), include_dirs=include_dirs,
                            extra_compile_args={"cxx": list(CXX_FLAGS)}, extra_link_args=["-fopenmp"])
    from torch.utils.cpp_extension import CUDAExtension

    archs = os.environ.get("EUPMU_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    with_cuda = ["-DEUPMU_WITH_CUDA=1"]
    return CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources(root, cuda=True),
        include_dirs=include_dirs + _wheel_cuda_dirs("include"),
        library_dirs=_cudart_link_dir(root),
        extra_compile_args={"cxx": list(CXX_FLAGS) + with_cuda, "nvcc": NVCC_FLAGS + with_cuda + gencode_flags(archs)},
        extra_link_args=["-fopenmp"],
    )
