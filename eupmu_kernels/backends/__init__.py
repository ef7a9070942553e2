"""Kernel backends (torch, Triton, compiled extension) behind one contract: see ``eupmu_kernels.contract``."""
