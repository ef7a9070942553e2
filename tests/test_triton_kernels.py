"""What only the Triton backend has: its launch-metadata tables and its layout checks.

Everything of the kernel contract itself (Gramian, coefficient stage, combine, fused step, skips,
the numerical range) is checked for every backend, the Triton one included, in tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import DEVICE, SIZE_CASES, STORAGE_DTYPES, UNAVAILABLE, make_tensors

from eupmu_kernels.contract import RuleStateLists, StepHyper, SurgeryConfig

pytestmark = [pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=str(UNAVAILABLE["triton"])),
              pytest.mark.threads(1)]


@pytest.fixture(scope="module")
def backend():
    from eupmu_kernels.backends.triton_backend import TritonBackend

    return TritonBackend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gramian_is_bit_identical_with_a_rebuilt_table(backend, dtype):
    from eupmu_kernels.triton.tables import TABLES

    shapes = SIZE_CASES["many_small_plus_large"]
    a = make_tensors(shapes, dtype, seed=3, device=DEVICE)
    b = make_tensors(shapes, dtype, seed=4, device=DEVICE)
    first = backend.gramian(a, b)
    again = backend.gramian(a, b)
    TABLES.clear()  # a rebuilt table must give the same bits too
    rebuilt = backend.gramian(a, b)
    assert torch.equal(first, again) and torch.equal(first, rebuilt)


def test_table_is_cached_while_tensors_stay(backend):
    from eupmu_kernels.triton.tables import TABLES

    a = make_tensors([(5,), (4097,)], seed=7, device=DEVICE)
    backend.gramian(a, None)
    builds = TABLES.builds
    backend.gramian(a, None)
    assert TABLES.builds == builds
    backend.gramian([t.clone() for t in a], None)
    assert TABLES.builds == builds + 1


def test_supports_and_layout_errors(backend):
    for dtype in STORAGE_DTYPES:
        assert backend.supports(DEVICE, dtype)
    assert not backend.supports(DEVICE, torch.float64)
    assert not backend.supports(torch.device("meta"), torch.float32)

    p = torch.randn(6, 5, device=DEVICE)
    transposed = torch.randn(5, 6, device=DEVICE).t()  # same shape, other strides
    with pytest.raises(ValueError, match="strides"):
        backend.gramian([p], [transposed])
    strided = torch.randn(12, device=DEVICE)[::2]
    with pytest.raises(ValueError, match="not dense"):
        backend.gramian([strided], None)
    st = RuleStateLists(step=[torch.zeros((), device=DEVICE)], exp_avg=[torch.zeros(6, 5, device=DEVICE)],
                        exp_avg_sq=[torch.zeros(5, 6, device=DEVICE).t()])
    coef = backend.coefficients(backend.gramian([p], None), SurgeryConfig("none"), None, None)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        backend.step_("adam", [p], [p.clone()], None, st, coef, StepHyper(lr=0.1))
    # a dense but transposed parameter works when everything of it shares the layout
    pt = torch.randn(5, 6, device=DEVICE).t()
    g = torch.randn(5, 6, device=DEVICE).t()
    assert torch.isfinite(backend.gramian([pt], [g])).all()
