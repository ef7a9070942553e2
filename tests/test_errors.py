"""Bad input raises errors that name the parameter and the problem."""

import pytest
import torch

from eupmu_kernels import EUPMU


def test_sparse_gradient_is_rejected_with_parameter_name():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = EUPMU(emb.named_parameters(), mode="implicit", backend="torch")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"'weight'.*sparse"):
        opt.step()


def test_sparse_retain_gradient_is_rejected_at_stash():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = EUPMU(emb.named_parameters(), mode="explicit", backend="torch")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"retain gradient of parameter 'weight' is a sparse"):
        opt.stash_retain_grad()


def test_explicit_step_without_retain_gradient():
    p = torch.nn.Parameter(torch.randn(3))
    opt = EUPMU([p], mode="explicit", backend="torch")
    p.sum().backward()
    with pytest.raises(RuntimeError, match="needs a retain gradient.*stash_retain_grad"):
        opt.step()


def test_mode_specific_calls_are_checked():
    p = torch.nn.Parameter(torch.randn(3))
    implicit = EUPMU([p], mode="implicit", backend="torch")
    with pytest.raises(RuntimeError, match=r"stash_retain_grad\(\) is for mode='explicit'"):
        implicit.stash_retain_grad()
    with pytest.raises(RuntimeError, match="update_dual"):
        implicit.update_dual(torch.tensor(1.0))
    explicit = EUPMU([p], mode="explicit", backend="torch")
    with pytest.raises(RuntimeError, match=r"combine\(\) is for mode='implicit'"):
        explicit.combine(torch.tensor(1.0), torch.tensor(1.0))


def test_gradient_with_wrong_dtype_or_device_names_parameter():
    lin = torch.nn.Linear(2, 2)
    opt = EUPMU(lin.named_parameters(), mode="implicit", backend="torch")
    lin.weight.grad = torch.zeros(2, 2)
    lin.bias.grad_dtype = None  # torch itself refuses a foreign grad dtype otherwise
    lin.bias.grad = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"'bias' has dtype torch.float64"):
        opt.step()


def test_parameters_on_two_devices_are_bucketed_apart():
    cpu = torch.nn.Parameter(torch.randn(3))
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = EUPMU([cpu, meta], mode="explicit", backend="torch")
    opt.zero_grad()
    assert {b.device.type for b in opt.buckets} == {"cpu", "meta"}
    assert all(len({p.device for p in b.params}) == 1 for b in opt.buckets)


def test_invalid_configuration():
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match="rule"):
        EUPMU(p, rule="lion")
    with pytest.raises(ValueError, match="mode"):
        EUPMU(p, mode="both")
    with pytest.raises(ValueError, match="surgery"):
        EUPMU(p, surgery="mgda")
    with pytest.raises(ValueError, match="tolerance"):
        EUPMU(p, mode="explicit", tolerance=-1.0)
    with pytest.raises(ValueError, match="dual"):
        EUPMU(p, dual="sgd")
    with pytest.raises(ValueError, match="backend"):
        EUPMU(p, backend="jax")
    with pytest.raises(ValueError, match="nesterov"):
        EUPMU(p, rule="sgd", nesterov=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        EUPMU(p, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="lr must be a float, got a Tensor"):
        EUPMU(p, lr=torch.tensor(0.1), mode="implicit")


def test_unavailable_backend_is_explained(monkeypatch):
    from eupmu_kernels import dispatch

    monkeypatch.setattr(dispatch, "_load", lambda name: None if name == "native" else dispatch.TorchBackend())
    with pytest.raises(dispatch.BackendUnavailableError, match="EUPMU_BUILD_EXT=1"):
        dispatch.get_backend("native", torch.device("cpu"), torch.float32)


def test_non_dense_parameter_is_rejected():
    base = torch.randn(4, 4)
    p = torch.nn.Parameter(base[:, ::2])  # a strided view: not dense
    with pytest.raises(ValueError, match="not dense"):
        EUPMU([p], mode="explicit", backend="torch")


def test_cuda_is_a_deprecated_alias_of_native(monkeypatch):
    from eupmu_kernels import dispatch

    with pytest.warns(DeprecationWarning, match="use 'native'"):
        assert dispatch.requested_backend("cuda") == "native"
    monkeypatch.setenv("EUPMU_BACKEND", "CUDA")
    with pytest.warns(DeprecationWarning, match="environment variable EUPMU_BACKEND='cuda'"):
        assert dispatch.requested_backend(None) == "native"
    monkeypatch.delenv("EUPMU_BACKEND")
    with pytest.warns(DeprecationWarning):
        opt = EUPMU([torch.nn.Parameter(torch.zeros(3))], mode="implicit", backend="cuda")
    assert opt.backend == "native"
    assert "cuda" not in dispatch.available_backends()
    with pytest.raises(ValueError, match="native"):
        dispatch.requested_backend("gpu")
