"""Functional ops (torch backend) against the float64 reference."""

import pytest
import torch
from helpers import SIZE_CASES, STORAGE_DTYPES, STORE_RTOL, assert_close_rel, flat64, make_tensors

from eupmu_kernels import ops
from eupmu_kernels import reference as ref
from eupmu_kernels.backends.base import CA, CB, CLIP, LAM, SKIP, A


@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gramian_matches_reference(case, dtype):
    shapes = SIZE_CASES[case]
    a = make_tensors(shapes, dtype, seed=1)
    b = make_tensors(shapes, dtype, seed=2)
    g = ops.gramian(a, b, backend="torch")
    assert g.dtype == torch.float64 and g.shape == (3,)
    # the reference sees the stored (already rounded) values; both accumulate in float64, in
    # different orders: |error| <= n * 2^-53 * sum|x_i y_i| <= n * 1.1e-16 * ||x|| ||y||
    expected = ref.gramian(flat64(a), flat64(b))
    n = flat64(a).numel()
    scale = torch.stack([expected[0], expected[0].sqrt() * expected[2].sqrt(), expected[2]])
    assert torch.all((g - expected).abs() <= n * 1.2e-16 * scale), (g, expected)


def test_gramian_without_b():
    a = make_tensors(SIZE_CASES["many_small_plus_large"], seed=4)
    g = ops.gramian(a, backend="torch")
    assert g[1] == 0 and g[2] == 0
    assert g[0].item() == pytest.approx(float(flat64(a) @ flat64(a)), rel=1e-12)


@pytest.mark.parametrize("method", ["ungrad", "pcgrad", "graddiff"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_surgery_matches_reference(method, max_norm, case, dtype):
    shapes = SIZE_CASES[case]
    g_f = make_tensors(shapes, dtype, seed=5)
    # make the two gradients conflict so that surgery actually does something
    g_r = [(-0.7 * f.double() + 0.5 * r.double()).to(dtype) for f, r in zip(g_f, make_tensors(shapes, dtype, seed=6))]
    expected = ref.surgery(flat64(g_f), flat64(g_r), method, eps=0.01, alpha=0.3, max_norm=max_norm)
    res = ops.surgery_(g_f, g_r, method=method, eps=0.01, alpha=0.3, max_norm=max_norm, backend="torch")
    assert_close_rel(flat64(g_f), expected, STORE_RTOL[dtype] + 2e-6, f"{method} {case} {dtype}")
    assert res.skipped.item() == 0.0
    if max_norm is not None:
        assert res.clip.item() <= 1.0


def test_surgery_constraint_and_untouched_retain_gradient():
    g_f = make_tensors(SIZE_CASES["many_small_plus_large"], seed=7)
    g_r = [-x + 0.1 * y for x, y in zip(g_f, make_tensors(SIZE_CASES["many_small_plus_large"], seed=8))]
    g_r_before = [t.clone() for t in g_r]
    res = ops.surgery_(g_f, g_r, method="ungrad", eps=0.0, backend="torch")
    assert res.coefficients[1].item() > 0  # lambda* > 0: they conflicted
    assert all(torch.equal(x, y) for x, y in zip(g_r, g_r_before))
    dot = float(flat64(g_f) @ flat64(g_r))
    assert dot >= -1e-5 * float(flat64(g_f).norm() * flat64(g_r).norm())


def test_nonfinite_gradient_leaves_forget_gradient_unchanged():
    g_f = make_tensors([(5,), (3,)], seed=1)
    g_r = make_tensors([(5,), (3,)], seed=2)
    g_r[1][0] = float("nan")
    before = [t.clone() for t in g_f]
    res = ops.surgery_(g_f, g_r, backend="torch")
    assert res.skipped.item() == 1.0
    assert all(torch.equal(x, y) for x, y in zip(g_f, before))


def test_coefficients_scale_and_found_inf():
    gram = torch.tensor([4.0, -2.0, 1.0]) * 16.0  # gradients scaled by 4
    coef = ops.coefficients(gram, inv_scale=torch.tensor(0.25), backend="torch")
    # lambda* from the unscaled Gramian is 2; d is unscaled by 1/4
    assert coef[CA].item() == pytest.approx(0.25) and coef[CB].item() == pytest.approx(0.5)
    skipped = ops.coefficients(gram, found_inf=torch.tensor(1.0), backend="torch")
    assert skipped[SKIP].item() == 1.0 and skipped[CA].item() == 1.0 and skipped[CB].item() == 0.0


@pytest.mark.parametrize("method, lam", [("ungrad", 0.0), ("pcgrad", 1.0), ("graddiff", 1.0)])
def test_coefficients_of_zero_gradients(method, lam):
    """Zero gradients: no conflict, d = 0, no clipping, cos defined as 0, nothing skipped."""
    coef = ops.coefficients(torch.zeros(3, dtype=torch.float64), method=method, max_norm=1.0, backend="torch")
    expected = torch.zeros(8)
    expected[[CA, CB, LAM, CLIP, A]] = torch.tensor([1.0, lam, lam, 1.0, 1.0])
    assert torch.equal(coef, expected), coef


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
