"""Test configuration.

Without a GPU, Triton kernels run in the interpreter on CPU tensors. TRITON_INTERPRET must be
set before any ``@triton.jit`` function is defined, i.e. before eupmu_kernels is imported.

``@pytest.mark.threads(n)`` (on a test or a module) runs the test with n intra-op threads and
restores the previous count afterwards: tiny tensors gain nothing from more threads on a busy
machine, and the CPU kernels' parallel split needs at least two to be exercised.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import eupmu_kernels  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "threads(n): run the test with n intra-op threads (torch.set_num_threads)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def threads(request):
    """The intra-op thread count of the test's ``threads`` mark (unchanged without one)."""
    mark = request.node.get_closest_marker("threads")
    if mark is None:
        yield torch.get_num_threads()
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(mark.args[0])
    try:
        yield mark.args[0]
    finally:
        torch.set_num_threads(previous)
