"""Forget one digit class with ``eupmu_kernels.EUPMU`` inside your own training loop.

    python examples/forget_a_digit.py                     # implicit surgery (one backward pass)
    python examples/forget_a_digit.py --mode explicit     # unilateral surgery (two backward passes)

The data is scikit-learn's bundled 8x8 digits (no download). A small MLP is trained on all
classes, then the optimizer unlearns class ``--forget`` (random-label cross-entropy on the forget
samples, cross-entropy on the rest) while keeping the accuracy on the other classes.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from eupmu_kernels import EUPMU


def load(forget_class: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    forget = y == forget_class
    return (x[forget], y[forget]), (x[~forget], y[~forget])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def unlearn(model: nn.Module, forget, retain, mode: str, steps: int, num_classes: int = 10) -> None:
    # The authors' classification recipe: SGD with momentum, the "reference" dual rule (log losses,
    # Adam on the multiplier w) and err = 0.01, i.e. tolerance = -0.01 (demand a retain improvement).
    if mode == "implicit":
        opt = EUPMU(model.parameters(), lr=1e-3, rule="sgd", momentum=0.9, weight_decay=5e-4,
                    mode="implicit", dual="reference", tolerance=-0.01)
    else:
        opt = EUPMU(model.parameters(), lr=1e-3, rule="sgd", momentum=0.9, weight_decay=5e-4,
                    mode="explicit", surgery="ungrad", tolerance=0.0)
    (xf, yf), (xr, yr) = forget, retain
    for _ in range(steps):
        f_idx = torch.randint(len(yf), (32,))
        r_idx = torch.randint(len(yr), (128,))
        wrong = (yf[f_idx] + torch.randint(1, num_classes, (32,))) % num_classes  # any label but the true one
        opt.zero_grad()
        forget_loss = F.cross_entropy(model(xf[f_idx]), wrong)
        retain_loss = F.cross_entropy(model(xr[r_idx]), yr[r_idx])
        if mode == "implicit":
            opt.combine(forget_loss, retain_loss).backward()
            opt.step()
            with torch.no_grad():  # exact dual update: the retain loss after the step, same batch
                opt.update_dual(F.cross_entropy(model(xr[r_idx]), yr[r_idx]))
        else:
            retain_loss.backward()
            opt.stash_retain_grad()
            forget_loss.backward()
            opt.step()
    stats = opt.stats()  # device tensors: read them once, after the loop
    print("last step:", {k: round(float(v), 4) for k, v in stats.items() if v.numel() == 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="implicit")
    parser.add_argument("--forget", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    forget, retain = load(args.forget)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    train(model, torch.cat([forget[0], retain[0]]), torch.cat([forget[1], retain[1]]))
    print(f"before: forget acc {accuracy(model, *forget):5.1f}  retain acc {accuracy(model, *retain):5.1f}")
    unlearn(model, forget, retain, args.mode, args.steps)
    print(f"after:  forget acc {accuracy(model, *forget):5.1f}  retain acc {accuracy(model, *retain):5.1f}")


if __name__ == "__main__":
    main()
