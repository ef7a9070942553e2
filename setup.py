"""Build script: the Python packages, plus the compiled extension ``eupmu_kernels._C`` (the
``native`` backend) when it can be built.

Install with the torch you will run (the extension compiles against it):
``pip install --no-build-isolation --no-deps -e .``

EUPMU_BUILD_EXT   auto (default): build the extension when torch and a C++ compiler are present
                  (CPU-only torch included): its C++ CPU kernels, as a CppExtension.
                  1: build it or fail loudly.  0: never build it.
EUPMU_BUILD_CUDA  auto (default): add the CUDA kernels (a CUDAExtension) when torch is a CUDA build
                  and nvcc is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda or PATH).
                  1: add them or fail loudly (implies EUPMU_BUILD_EXT=1).  0: C++ CPU kernels only.
EUPMU_CUDA_ARCHS  semicolon/comma separated compute capabilities (default "8.0;9.0").

``eupmu_kernels._C.has_cuda_kernels()`` tells which build a module is. The build writes the
generated contract header (slots and codes) into build/eupmu_generated/.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The library (eupmu_kernels), its applications (eupmu_unlearn) and the benchmarks (eupmu_bench,
# whose package folder is benchmarks/eupmu_bench), with every subpackage.
PACKAGES = [*find_packages(ROOT, include=["eupmu_kernels", "eupmu_kernels.*", "eupmu_unlearn", "eupmu_unlearn.*"]),
            *find_packages(os.path.join(ROOT, "benchmarks"), include=["eupmu_bench", "eupmu_bench.*"])]
PACKAGE_DIR = {"eupmu_bench": "benchmarks/eupmu_bench"}

CONFIG = os.path.join(ROOT, "csrc", "build_ext_config.py")


def _load_config():
    sys.path.insert(0, os.path.dirname(CONFIG))
    try:
        import build_ext_config  # csrc/build_ext_config.py
    finally:
        sys.path.pop(0)
    return build_ext_config


def _extensions():
    if not os.path.isfile(CONFIG):  # a source tree without csrc/: nothing to compile
        asked = [name for name in ("EUPMU_BUILD_EXT", "EUPMU_BUILD_CUDA") if os.environ.get(name, "").strip() == "1"]
        if asked:
            sys.exit(f"eupmu_kernels: {asked[0]}=1 but the extension's sources (csrc/) are not here")
        print("eupmu_kernels: skipping the compiled extension (no csrc/ in this source tree)", file=sys.stderr)
        return [], {}
    config = _load_config()
    try:
        ext_mode, cuda_mode = config.read_mode("EUPMU_BUILD_EXT"), config.read_mode("EUPMU_BUILD_CUDA")
    except ValueError as err:
        sys.exit(str(err))
    plan = config.plan_build(ext_mode, cuda_mode, config.probe())
    if plan.error is not None:
        sys.exit(f"eupmu_kernels: {plan.error}")
    for note in plan.notes:
        print(f"eupmu_kernels: {note}", file=sys.stderr)
    if not plan.extension:
        return [], {}
    if plan.cuda:
        os.environ["CUDA_HOME"] = config.find_cuda_home()  # must precede the cpp_extension import
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            config.write_contract_header(ROOT)  # the generated slots and codes, on the include path
            super().build_extensions()

    return [config.make_extension(ROOT, cuda=plan.cuda)], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"eupmu_unlearn": ["data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
