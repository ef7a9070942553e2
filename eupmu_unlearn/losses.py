"""Forget-loss formulas shared by the Hugging Face integration and the LLM pipeline."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def npo_from_log_ratio(log_ratio: Tensor, beta: float) -> Tensor:
    """Negative preference optimisation, (2/beta) E[log(1 + (pi/pi_ref)^beta)] >= 0, minimised.

    ``log_ratio`` holds log pi_theta(y|x) - log pi_ref(y|x) per forget sequence.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
