"""Benchmarks and profiling for eupmu_kernels against naive and composed gradient surgery.

Entry points: the ``eupmu-bench`` command (:mod:`eupmu_bench.cli`), the kernel micro-benchmarks
(``pytest benchmarks/bench_kernels.py``), the profiler comparison
(``python -m eupmu_bench.profile_step``) and ``benchmarks/gpu_suite.sh`` for a GPU machine.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
