"""Build script: the Python package, plus the compiled extension ``eupmu_kernels._C`` when asked.

EUPMU_BUILD_CUDA=auto (default): build when torch is a CUDA build and nvcc is found.
EUPMU_BUILD_CUDA=1: build or fail loudly.  EUPMU_BUILD_CUDA=0: never build.
EUPMU_CUDA_ARCHS: semicolon/comma separated compute capabilities (default "8.0;9.0").
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The library (eupmu_kernels), its applications (eupmu_unlearn) and the benchmarks (eupmu_bench,
# whose package folder is benchmarks/eupmu_bench), with every subpackage.
PACKAGES = [*find_packages(ROOT, include=["eupmu_kernels", "eupmu_kernels.*", "eupmu_unlearn", "eupmu_unlearn.*"]),
            *find_packages(os.path.join(ROOT, "benchmarks"), include=["eupmu_bench", "eupmu_bench.*"])]
PACKAGE_DIR = {"eupmu_bench": "benchmarks/eupmu_bench"}


def _build_mode() -> str:
    mode = os.environ.get("EUPMU_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"EUPMU_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _find_cuda_home() -> str | None:
    # torch's own guess can land on a wrapper script in /usr/local/bin; prefer the real toolkit.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _why_not_buildable() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (install it first and use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _find_cuda_home() is None:
        return "nvcc was not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(ROOT, "csrc", "*.cu")):
        return "no CUDA sources in csrc/"
    return None


def _extensions():
    mode = _build_mode()
    if mode == "0":
        return [], {}
    reason = _why_not_buildable()
    if reason is not None:
        if mode == "1":
            sys.exit(f"EUPMU_BUILD_CUDA=1 but the extension cannot be built: {reason}")
        print(f"eupmu_kernels: skipping the compiled extension ({reason})", file=sys.stderr)
        return [], {}
    os.environ["CUDA_HOME"] = _find_cuda_home()  # must precede the cpp_extension import
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    from build_ext_config import make_extension  # noqa: E402  (csrc/build_ext_config.py)

    from torch.utils.cpp_extension import BuildExtension

    return [make_extension(ROOT)], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"eupmu_unlearn": ["data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
