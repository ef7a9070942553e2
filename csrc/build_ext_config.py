"""Build description of the compiled extension ``eupmu_kernels._C`` (imported by setup.py).

setup.py sets CUDA_HOME before importing this module. Environment:

EUPMU_CUDA_ARCHS  compute capabilities, separated by ';', ',' or spaces (default "8.0;9.0");
                  "9.0a" selects the arch-specific target, "+PTX" on one also embeds its PTX.
                  The highest listed arch always embeds PTX, so newer GPUs can JIT it.
"""

from __future__ import annotations

import glob
import importlib
import os
import re

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


def _sources(root: str) -> list[str]:
    csrc = os.path.join(root, "csrc")
    paths = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    return [os.path.relpath(p, root) for p in paths]


def make_extension(root: str):
    from torch.utils.cpp_extension import CUDAExtension

    archs = os.environ.get("EUPMU_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    return CUDAExtension(
        name=EXTENSION_NAME,
        sources=_sources(root),
        include_dirs=[os.path.join(root, "csrc")] + _wheel_cuda_dirs("include"),
        library_dirs=_cudart_link_dir(root),
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": NVCC_FLAGS + gencode_flags(archs)},
        extra_link_args=["-fopenmp"],
    )
