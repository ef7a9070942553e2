"""Test configuration.

Without a GPU, Triton kernels run in the interpreter on CPU tensors. TRITON_INTERPRET must be
set before any ``@triton.jit`` function is defined, i.e. before eupmu_kernels is imported.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import eupmu_kernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
