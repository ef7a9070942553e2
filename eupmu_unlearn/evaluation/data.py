"""Offline classification data and forgetting scenarios.

Two datasets, both available without any download:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), pixels
  scaled to [0, 1]. A fixed stratified 20% is the test split.
- ``mnist1d``: MNIST-1D generated locally by ``mnist1d.data.make_dataset`` with its default
  arguments (4,000 train / 1,000 test sequences of length 40, 10 classes). Its downloading
  loader is never used.

The test split is the same for every seed; a stratified validation split (10% of the remaining
training data) is drawn per seed and is the only data hyperparameters are selected on.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "mnist1d")
NUM_CLASSES = {"digits": 10, "mnist1d": 10}  # known without loading the data (checked by the tests)
SCENARIOS = ("class", "random")
TEST_SEED = 12345  # fixes the digits test split independently of the run's seed
DIGITS_TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
RANDOM_FORGET_FRACTION = 0.1


@dataclass(frozen=True)
class Split:
    """Inputs (float32) and integer labels of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Tensor) -> "Split":
        return Split(self.x[index], self.y[index])

    def where(self, mask: Tensor) -> "Split":
        return Split(self.x[mask], self.y[mask])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class ClassificationData:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Scenario:
    """Which training samples are forgotten.

    ``kind="class"`` forgets every training sample of ``forget_class``; ``kind="random"`` a random
    ``RANDOM_FORGET_FRACTION`` of the training set. Evaluation splits are restricted to the kept
    classes with :meth:`kept` (a no-op for random forgetting).
    """

    kind: str
    forget_class: int | None
    forget: Split
    retain: Split

    def kept(self, split: Split) -> Split:
        if self.forget_class is None:
            return split
        return split.where(split.y != self.forget_class)

    def forgotten_class(self, split: Split) -> Split | None:
        if self.forget_class is None:
            return None
        return split.where(split.y == self.forget_class)

    def describe(self) -> str:
        if self.kind == "class":
            return f"class-wise forgetting of class {self.forget_class}"
        return f"random forgetting of {len(self.forget)} training samples"


def forget_class_problem(dataset: str, forget_class: int) -> str | None:
    """Why ``forget_class`` is not a class of ``dataset``, or None (checked without loading the data)."""
    classes = NUM_CLASSES[dataset]
    if 0 <= forget_class < classes:
        return None
    return f"must be in [0, {classes - 1}] for {dataset} ({classes} classes), got {forget_class}"


def load_dataset(name: str, seed: int) -> ClassificationData:
    """The named dataset with a seed-dependent validation split carved from its training data."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    x_train, y_train, x_test, y_test, shape = _load_digits() if name == "digits" else _load_mnist1d()
    train_idx, val_idx = _stratified_split(y_train, VAL_FRACTION, seed)
    train = _to_split(x_train[train_idx], y_train[train_idx])
    val = _to_split(x_train[val_idx], y_train[val_idx])
    test = _to_split(x_test, y_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ClassificationData(name, train, val, test, num_classes, shape)


def make_scenario(data: ClassificationData, kind: str, forget_class: int = 0, seed: int = 0,
                  fraction: float = RANDOM_FORGET_FRACTION) -> Scenario:
    """Split the training set into forget and retain sets."""
    if kind not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {kind!r}")
    train = data.train
    if kind == "class":
        if not 0 <= forget_class < data.num_classes:
            raise ValueError(f"forget class must be in [0, {data.num_classes}), got {forget_class}")
        mask = train.y == forget_class
        return Scenario(kind, forget_class, train.where(mask), train.where(~mask))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the forget fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    n_forget = max(1, round(fraction * len(train)))
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[order[:n_forget]] = True
    return Scenario(kind, None, train.where(mask), train.where(~mask))


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    # torch.tensor copies: the loaders' arrays are cached and must never be shared with a Split
    return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with about ``fraction`` of every class held out."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(y, DIGITS_TEST_FRACTION, TEST_SEED)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], (8, 8)


@functools.lru_cache(maxsize=1)  # generated once per process (the suite loads it for every context)
def _load_mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global numpy and random generators; keep the caller's streams intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x, x_test = raw["x"].astype(np.float32), raw["x_test"].astype(np.float32)
    y, y_test = raw["y"].astype(np.int64), raw["y_test"].astype(np.int64)
    return x, y, x_test, y_test, (x.shape[1],)
