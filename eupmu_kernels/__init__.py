"""Fast utility-preserving machine unlearning: EUPMU gradient surgery kernels and optimizer."""

from . import ops
from .dispatch import available_backends
from .optimizer import EUPMU

__version__ = "0.1.0"

__all__ = ["EUPMU", "ops", "available_backends", "__version__"]
