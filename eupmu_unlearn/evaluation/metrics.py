"""The image-classification unlearning metrics, and their aggregation over seeds.

- UA (unlearning accuracy) = 100 - accuracy on the forget set.
- RA = accuracy on the retain set.
- TA = test accuracy on the kept classes (class-wise forgetting) or on all classes (random
  forgetting); TA_all is always over all classes.
- MIA (MIA-efficacy): an RBF support-vector classifier (C=3) is fitted on the per-sample confidence
  (softmax probability of the true label) with members = a retain subset as large as the test
  split and non-members = the test split; the score is the share of forget samples it calls
  non-members.
- RTE: wall-clock seconds of the unlearning run; peak_tensor_mib: peak tensor memory of its first
  steps (:mod:`eupmu_unlearn.memory`).
- gap: the average over (UA, RA, TA, MIA) of the absolute difference to the retrained model.

All accuracies and shares are percentages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data import Scenario, Split

GAP_KEYS = ("UA", "RA", "TA", "MIA")
MIA_C = 3.0
EVAL_BATCH = 4096


@dataclass
class UnlearningMetrics:
    UA: float
    RA: float
    TA: float
    TA_all: float
    MIA: float
    forget_class_test_acc: float | None = None  # class-wise: test accuracy on the forgotten class
    RTE: float | None = None  # seconds
    peak_tensor_mib: float | None = None
    gap: float | None = None  # average gap to the retrained model

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, float | None]) -> "UnlearningMetrics":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor) -> Tensor:
    """Softmax probabilities, evaluated in eval mode and in batches."""
    was_training = model.training
    model.eval()
    parts = [torch.softmax(model(x[i:i + EVAL_BATCH]).float(), dim=1) for i in range(0, x.shape[0], EVAL_BATCH)]
    model.train(was_training)
    if not parts:
        return torch.empty(0, 0)
    return torch.cat(parts)


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy in percent (nan for an empty split)."""
    if len(split) == 0:
        return math.nan
    pred = predict_proba(model, split.x).argmax(dim=1)
    return float((pred == split.y).float().mean()) * 100.0


def true_label_confidence(model: nn.Module, split: Split) -> np.ndarray:
    """Per-sample softmax probability of the true label (0 where a diverged model gives NaN)."""
    if len(split) == 0:
        return np.zeros(0)
    probs = predict_proba(model, split.x)
    conf = probs.gather(1, split.y.to(probs.device).unsqueeze(1)).squeeze(1).cpu().double().numpy()
    return np.nan_to_num(conf, nan=0.0)


def mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray, target_conf: np.ndarray) -> float:
    """Share (percent) of ``target_conf`` samples that an RBF SVC (C=3) calls non-members.

    The SVC is fitted on confidences with members labelled 1 and non-members 0 (gamma="auto",
    i.e. 1 / number of features, as in the standard protocol).
    """
    from sklearn.svm import SVC

    if len(target_conf) == 0:
        return math.nan
    x = np.concatenate([member_conf, nonmember_conf]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    if len(np.unique(y)) < 2:
        raise ValueError("MIA needs both members and non-members")
    clf = SVC(C=MIA_C, kernel="rbf", gamma="auto")
    clf.fit(x, y)
    called_member = clf.predict(np.asarray(target_conf, dtype=float).reshape(-1, 1))
    return float(1.0 - called_member.mean()) * 100.0


def member_subset(retain: Split, size: int, seed: int) -> Split:
    """A fixed random retain subset of ``size`` samples (the MIA's members)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(retain), generator=gen)[:size]
    return retain.subset(order.to(retain.y.device))


def evaluate(model: nn.Module, scenario: Scenario, heldout: Split, members: Split) -> UnlearningMetrics:
    """UA, RA, TA, TA_all and MIA of ``model``.

    ``heldout`` is the test split for reporting or the validation split for model selection; it
    also serves as the MIA's non-members. ``members`` is the MIA's retain subset (see
    :func:`member_subset`, sized like ``heldout``).
    """
    forgotten = scenario.forgotten_class(heldout)
    mia = mia_efficacy(true_label_confidence(model, members), true_label_confidence(model, heldout),
                       true_label_confidence(model, scenario.forget))
    return UnlearningMetrics(
        UA=100.0 - accuracy(model, scenario.forget),
        RA=accuracy(model, scenario.retain),
        TA=accuracy(model, scenario.kept(heldout)),
        TA_all=accuracy(model, heldout),
        MIA=mia,
        forget_class_test_acc=None if forgotten is None else accuracy(model, forgotten),
    )


def average_gap(metrics: UnlearningMetrics, reference: UnlearningMetrics, keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean absolute difference to the reference (the retrained model) over ``keys``."""
    return float(np.mean([abs(getattr(metrics, k) - getattr(reference, k)) for k in keys]))


def mean_std(runs: Iterable[Mapping[str, float | None]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-key mean and sample standard deviation (ddof=1; 0 for a single run) over seeds.

    Keys whose value is missing (None) in any run are left out.
    """
    runs = list(runs)
    if not runs:
        return {}, {}
    keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
    mean, std = {}, {}
    for k in keys:
        values = np.array([float(r[k]) for r in runs])
        mean[k] = float(values.mean())
        std[k] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return mean, std
