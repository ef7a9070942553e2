"""On a GPU: a full optimizer step never synchronises the host with the device."""

import pytest
import torch

from eupmu_kernels import EUPMU, available_backends
from eupmu_kernels.dispatch import BackendUnavailableError, get_backend

pytestmark = pytest.mark.gpu


def _cuda_backends():
    names = []
    for name in available_backends():
        try:
            get_backend(name, torch.device("cuda"), torch.float32)
        except (BackendUnavailableError, RuntimeError):
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_step_has_no_host_sync(mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for backend in _cuda_backends():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()
        opt = EUPMU(model.parameters(), lr=1e-3, mode=mode, max_grad_norm=1.0, backend=backend)
        x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
        ce = torch.nn.functional.cross_entropy
        for _ in range(3):
            opt.zero_grad()
            forget, retain = -ce(model(x[:16]), y[:16]), ce(model(x[16:]), y[16:])
            if mode == "explicit":
                retain.backward()
                opt.stash_retain_grad()
                forget.backward()
            else:
                opt.combine(forget, retain).backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()  # warm-up steps included: state creation must not sync either
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(torch.stack([p.sum() for p in model.parameters()])).all(), backend
