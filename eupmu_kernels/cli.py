"""``eupmu-unlearn``: a short synthetic unlearning run (the real benchmark comes with the evaluation module)."""

from __future__ import annotations

import argparse

import torch

from .optimizer import EUPMU


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eupmu-unlearn", description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="explicit")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    x_f, y_f = torch.randn(64, 16), torch.randint(0, 4, (64,))
    x_r, y_r = torch.randn(256, 16), torch.randint(0, 4, (256,))
    loss = torch.nn.functional.cross_entropy
    opt = EUPMU(model.parameters(), lr=1e-2, mode=args.mode)
    for _ in range(args.steps):
        opt.zero_grad()
        forget = -loss(model(x_f), y_f)
        retain = loss(model(x_r), y_r)
        if args.mode == "explicit":
            retain.backward()
            opt.stash_retain_grad()
            forget.backward()
        else:
            opt.combine(forget, retain).backward()
        opt.step()
    print(f"forget loss {-forget.item():.3f}  retain loss {retain.item():.3f}")
    return 0
