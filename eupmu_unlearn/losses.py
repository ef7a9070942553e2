"""The unlearning losses of every application, by one name each (docs/design.md, Applications).

Forget losses (all minimised; each is computed on the forget side of a batch):

- ``"ga"``: gradient ascent, minus the cross-entropy of the true targets. Negative and unbounded
  below, so it cannot go through a dual rule that takes the log of the losses.
- ``"npo"``: negative preference optimisation, (2/beta) E[log(1 + (pi/pi_ref)^beta)] >= 0, where
  pi is the likelihood of an example's targets and pi_ref the same under the model the unlearning
  started from.
- ``"simnpo"``: SimNPO (Fan et al., 2024), NPO without the reference model:
  (2/beta) E[log(1 + exp(beta * log pi / |y| + gamma))] >= 0, with log pi / |y| the
  length-normalised log-likelihood of an example's |y| target tokens and gamma >= 0 a margin.
- ``"random-label"``: the cross-entropy to a random wrong class, >= 0 (classification only).

The retain loss is the cross-entropy of the true targets of the retain side.

The formulas are written here once. An application describes one side of its batches as a
:class:`Side`: how the model scores that side's true targets (cross-entropy, log-probability per
example), for class labels (:mod:`eupmu_unlearn.evaluation.unlearning`) or for token sequences
(:mod:`eupmu_unlearn.llm.tokens`).
"""

from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor

FORGET_LOSSES = ("ga", "npo", "simnpo", "random-label")
NPO_BETA = 0.1
SIMNPO_BETA = 2.5
SIMNPO_GAMMA = 0.0


class Side(Protocol):
    """The forget or the retain side of one batch, as the model scores it."""

    reference_log_prob: Tensor | None  # NPO: log-probability per example under the starting model

    def cross_entropy(self) -> Tensor:
        """Mean cross-entropy of the true targets."""

    def random_label_cross_entropy(self) -> Tensor:
        """Mean cross-entropy to a random wrong class per example."""

    def log_prob(self) -> Tensor:
        """Log-probability of each example's targets (summed over its tokens), shape (batch,)."""

    def target_count(self) -> Tensor:
        """Number of scored targets of each example, shape (batch,) (SimNPO's length |y|)."""


def check_forget_loss(name: str, supported: tuple[str, ...] = FORGET_LOSSES) -> str:
    """``name`` if it is a forget loss in ``supported``, else a ValueError naming the choices."""
    if name not in supported:
        raise ValueError(f"forget loss must be one of {', '.join(supported)}, got {name!r}")
    return name


def forget_loss(name: str, side: Side, npo_beta: float = NPO_BETA, simnpo_beta: float = SIMNPO_BETA,
                simnpo_gamma: float = SIMNPO_GAMMA) -> Tensor:
    """The forget loss ``name`` of the forget side of a batch."""
    if name == "ga":
        return -side.cross_entropy()
    if name == "npo":
        if side.reference_log_prob is None:
            raise ValueError("the npo forget loss needs the starting model's log-probabilities of the forget batch")
        return npo(side.log_prob() - side.reference_log_prob, npo_beta)
    if name == "simnpo":
        return simnpo(side.log_prob() / side.target_count(), simnpo_beta, simnpo_gamma)
    if name == "random-label":
        return side.random_label_cross_entropy()
    raise ValueError(f"forget loss must be one of {', '.join(FORGET_LOSSES)}, got {name!r}")


def npo(log_ratio: Tensor, beta: float) -> Tensor:
    """(2/beta) E[log(1 + exp(beta * log_ratio))] >= 0 for log_ratio = log pi - log pi_ref per example."""
    if beta <= 0:
        raise ValueError(f"npo beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo(mean_log_prob: Tensor, beta: float, gamma: float = SIMNPO_GAMMA) -> Tensor:
    """(2/beta) E[log(1 + exp(beta * mean_log_prob + gamma))] >= 0, mean_log_prob = log pi / |y| per example.

    NPO's objective with the reference log-likelihood replaced by the margin -gamma and the
    log-likelihood normalised by the answer length, so long and short answers weigh alike.
    """
    if beta <= 0:
        raise ValueError(f"simnpo beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"simnpo gamma must be >= 0, got {gamma}")
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_log_prob - gamma).mean()
