"""Functional ops beyond the contract table (tests/test_contract.py): what surgery guarantees, input
checks, backend selection and grouping by dtype."""

import pytest
import torch
from fixtures import SIZE_CASES, flat64, make_tensors

from eupmu_kernels import ops
from eupmu_kernels import reference as ref


def test_surgery_constraint_and_untouched_retain_gradient():
    g_f = make_tensors(SIZE_CASES["many_small_plus_large"], seed=7)
    g_r = [-x + 0.1 * y for x, y in zip(g_f, make_tensors(SIZE_CASES["many_small_plus_large"], seed=8))]
    g_r_before = [t.clone() for t in g_r]
    res = ops.surgery_(g_f, g_r, method="ungrad", eps=0.0, backend="torch")
    assert res.coefficients[1].item() > 0  # lambda* > 0: they conflicted
    assert all(torch.equal(x, y) for x, y in zip(g_r, g_r_before))
    dot = float(flat64(g_f) @ flat64(g_r))
    assert dot >= -1e-5 * float(flat64(g_f).norm() * flat64(g_r).norm())


def test_ops_reject_bad_inputs():
    a = [torch.randn(3)]
    with pytest.raises(RuntimeError, match=r"tensors_b\[0\] is on meta"):
        ops.gramian(a, [torch.empty(3, device="meta")])
    with pytest.raises(TypeError, match=r"tensors_b\[0\] has dtype torch.float16"):
        ops.gramian(a, [torch.randn(3).half()])
    with pytest.raises(ValueError, match="tensors_b has 2"):
        ops.gramian(a, [torch.randn(3), torch.randn(3)])
    with pytest.raises(RuntimeError, match="sparse"):
        ops.gramian([torch.randn(3).to_sparse()])
    with pytest.raises(ValueError, match="method must be one of"):
        ops.surgery_(a, [torch.randn(3)], method="mgda")
    with pytest.raises(ValueError, match="tolerance"):
        ops.surgery_(a, [torch.randn(3)], tolerance=-1.0)
    with pytest.raises(ValueError, match="tolerance"):
        ops.surgery_(a, [torch.randn(3)], eps=-1.0)  # the former name of the argument


def test_backend_selection_errors(monkeypatch):
    monkeypatch.setenv("EUPMU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EUPMU_BACKEND"):
        ops.gramian([torch.randn(3)])
    monkeypatch.setenv("EUPMU_BACKEND", "torch")
    assert ops.gramian([torch.ones(4)])[0].item() == 4.0


def test_mixed_dtypes_are_grouped():
    a = [torch.randn(5), torch.randn(6).to(torch.bfloat16), torch.randn(2, dtype=torch.float64)]
    b = [torch.randn(5), torch.randn(6).to(torch.bfloat16), torch.randn(2, dtype=torch.float64)]
    g = ops.gramian(a, b, backend="torch")
    expected = ref.gramian(flat64(a), flat64(b))
    assert torch.allclose(g.double(), expected, rtol=1e-5)
