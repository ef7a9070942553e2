"""Triton kernels of the kernel contract (``eupmu_kernels.contract``).

One module per kernel family: ``tables`` (device address tables, one launch per group),
``gramian`` (deterministic two-stage reduction), ``coefficients`` (the coefficient vector from
the Gramian), ``update`` (fused combine + SGD/Adam/AdamW, combine only), ``update_space`` (the
reduction pass and coefficients of update-space surgery) and ``common`` (shared pointer and block
helpers). The update arithmetic is float32 (float64 for the bias corrections);
the Gramian and the coefficient stage are float64; storage is float32/float16/bfloat16.

Importing this package defines the ``@triton.jit`` kernels, so ``TRITON_INTERPRET`` must have its
final value by then: with ``TRITON_INTERPRET=1`` the kernels run in the interpreter on CPU
tensors, otherwise they compile for CUDA tensors. ``INTERPRETED`` records which.
"""

from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

from . import coefficients, common, gramian, tables, update, update_space  # noqa: E402

__all__ = ["INTERPRETED", "coefficients", "common", "gramian", "tables", "update", "update_space"]
