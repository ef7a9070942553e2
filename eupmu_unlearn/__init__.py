"""Applications of the EUPMU optimizer: unlearning benchmarks, the LLM pipeline, the Hugging Face integration.

The optimizer itself is :mod:`eupmu_kernels`; nothing here is imported by ``import eupmu_kernels``.
Submodules load their heavy dependencies (scikit-learn, matplotlib, transformers, ...) on demand.
"""
