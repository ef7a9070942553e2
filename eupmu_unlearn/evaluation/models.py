"""Small classifiers, their training, and an on-disk cache of trained weights.

The original model (trained on the whole training split) and the retrained gold standard
(trained on the retain set only) are deterministic functions of the dataset, architecture,
training recipe, seed and, for the retrained model, the scenario: their weights are cached
under a key built from all of these.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .data import Split

ARCHITECTURES = ("mlp", "cnn")
DEFAULT_ARCHITECTURE = {"digits": "mlp", "mnist1d": "cnn"}


class MLP(nn.Module):
    """Flatten, two hidden ReLU layers, linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three convolutions (2-d for images, 1-d for sequences), then a linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise ValueError(f"SmallCNN takes 1-d or 2-d inputs, got shape {input_shape}")
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(input_shape) == 1 else (nn.Conv2d, nn.MaxPool2d)
        self.spatial_dims = len(input_shape)
        self.features = nn.Sequential(
            conv(1, channels, 3, padding=1), nn.ReLU(),
            conv(channels, channels, 3, padding=1), nn.ReLU(), pool(2),
            conv(channels, channels, 3, padding=1), nn.ReLU(), pool(2),
            nn.Flatten(),
        )
        pooled = math.prod(size // 4 for size in input_shape)
        self.classifier = nn.Linear(channels * pooled, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (batch, *input_shape) -> (batch, 1, *input_shape)
        return self.classifier(self.features(x.unsqueeze(1)))


def build_model(architecture: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if architecture == "mlp":
        return MLP(input_shape, num_classes)
    if architecture == "cnn":
        return SmallCNN(input_shape, num_classes)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


@dataclass(frozen=True)
class TrainRecipe:
    """How the original and the retrained models are trained (AdamW, cosine schedule)."""

    epochs: int = 40
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4


DEFAULT_RECIPES = {
    ("digits", "mlp"): TrainRecipe(epochs=40),
    ("digits", "cnn"): TrainRecipe(epochs=30),
    ("mnist1d", "mlp"): TrainRecipe(epochs=60),
    ("mnist1d", "cnn"): TrainRecipe(epochs=60),
}


def default_recipe(dataset: str, architecture: str) -> TrainRecipe:
    return DEFAULT_RECIPES.get((dataset, architecture), TrainRecipe())


def train_classifier(model: nn.Module, data: Split, recipe: TrainRecipe, seed: int) -> nn.Module:
    """Mini-batch AdamW with cross-entropy; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), recipe.batch_size):
            batch = order[start:start + recipe.batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(data.x[batch]), data.y[batch]).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eupmu_kernels" / "models"


def cache_key(**fields: object) -> str:
    """A file stem that names the model and hashes everything it depends on."""
    blob = json.dumps(fields, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    readable = "-".join(str(fields[k]) for k in ("role", "dataset", "architecture", "seed") if k in fields)
    return f"{readable}-{digest}"


@dataclass
class CachedModel:
    model: nn.Module
    from_cache: bool
    train_seconds: float  # measured when the model was trained (also when loaded from the cache)


def load_or_train(cache_dir: Path | None, key: str, make: Callable[[], nn.Module],
                  train: Callable[[nn.Module], nn.Module]) -> CachedModel:
    """The cached model under ``key`` if present, else a freshly trained one (then cached)."""
    model = make()
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    meta_path = None if path is None else path.with_suffix(".json")
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        seconds = math.nan
        if meta_path is not None and meta_path.is_file():
            seconds = float(json.loads(meta_path.read_text()).get("train_seconds", math.nan))
        return CachedModel(model, True, seconds)
    start = time.perf_counter()
    model = train(model)
    seconds = time.perf_counter() - start
    if path is not None and meta_path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes that train the same model never share it
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        meta_path.write_text(json.dumps({"key": key, "train_seconds": seconds}))
    return CachedModel(model, False, seconds)

