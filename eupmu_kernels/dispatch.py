"""Backend selection.

``backend=`` arguments accept "auto", "torch", "triton" or "native" (the compiled extension
``eupmu_kernels._C``); ``None`` means "use the ``EUPMU_BACKEND`` environment variable, else auto".
"cuda", the compiled backend's former name, is still accepted for one release and means "native"
(with a DeprecationWarning). Auto order (docs/design.md, Kernel contract): CUDA tensors -> native
(when built with CUDA kernels) -> Triton -> torch; CPU tensors -> native -> torch.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import torch

from .contract import KernelBackend

BACKEND_ENV = "EUPMU_BACKEND"
BACKEND_NAMES = ("auto", "torch", "triton", "native")
# former names, accepted with a DeprecationWarning for one release
DEPRECATED_NAMES = {"cuda": "native"}

_MODULES = {
    "torch": ("eupmu_kernels.backends.torch_backend", "TorchBackend"),
    "triton": ("eupmu_kernels.backends.triton_backend", "TritonBackend"),
    "native": ("eupmu_kernels.backends.native_backend", "NativeBackend"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@lru_cache(maxsize=None)
def _load(name: str) -> KernelBackend | None:
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, class_name)()


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    name = name.strip().lower()
    source = "backend" if backend is not None else f"environment variable {BACKEND_ENV}"
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(f"{source}={name!r} is deprecated and will be removed in the next release; use {new!r} "
                      f"(the compiled extension: C++ CPU kernels, and CUDA kernels where built)",
                      DeprecationWarning, stacklevel=3)
        return new
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (on some device)."""
    return [n for n in ("torch", "triton", "native") if (b := _load(n)) is not None and b.available()]


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> KernelBackend:
    """The backend for one (device, dtype) group; ``name`` from :func:`requested_backend`."""
    if name == "auto":
        order = ("native", "triton", "torch") if device.type == "cuda" else ("native", "torch")
        for candidate in order:
            b = _load(candidate)
            if b is not None and b.available() and b.supports(device, dtype):
                return b
        raise BackendUnavailableError(f"no backend supports {device.type} tensors of dtype {dtype}")
    b = _load(name)
    if b is None or not b.available():
        raise BackendUnavailableError(_why_unavailable(name))
    if not b.supports(device, dtype):
        raise BackendUnavailableError(f"backend {name!r} does not support {device.type} tensors of dtype {dtype}")
    return b


def _why_unavailable(name: str) -> str:
    if name == "native":
        return ("backend 'native' needs the compiled extension eupmu_kernels._C, which is not built; "
                "reinstall with EUPMU_BUILD_EXT=1 (needs torch and a C++ compiler; its CUDA kernels "
                "also need a CUDA build of torch and nvcc)")
    if name == "triton":
        return ("backend 'triton' needs the triton package and either CUDA tensors or "
                "TRITON_INTERPRET=1 set before eupmu_kernels is imported")
    return f"backend {name!r} is not available"
