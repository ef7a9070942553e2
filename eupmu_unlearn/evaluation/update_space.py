"""Gradient- against update-space surgery per base rule: ``eupmu-unlearn update-space``.

Explicit UNGrad with tolerance 0 guarantees ``<d, g_r> >= 0`` for the combined gradient d
(gradient space). The base rule then turns d into the update it applies: momentum adds its
buffer, Adam preconditions. In update space the optimizer makes the applied update itself
satisfy ``<theta_{t+1} - theta_t, g_r> <= 0`` (docs/design.md, Update-space surgery).

This command unlearns one digits class from the cached original MLP with random-label forget
loss, ``steps`` steps (forget batch 32, retain batch 128, the same batches for every row), no
weight decay, for SGD, SGD with momentum 0.9 and Adam, in both spaces, and counts per run the
steps whose first-order retain change ``<theta_{t+1} - theta_t, g_r>`` (float64, from the
stored float32 parameters and the step's retain gradient) is positive beyond rounding: beyond
``16 * 2^-24 * sum |theta_{t+1}| |g_r|``, what rounding theta_{t+1} to float32 can explain (the
bound of ``tests/test_update_space.py``). It also reports the largest cos(update, g_r) and the
retain accuracy after the run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from eupmu_kernels import EUPMU

from ..loop import explicit_backward
from ..tables import markdown_table
from .metrics import accuracy
from .runner import BenchmarkConfig, prepare_seed
from .unlearning import BatchSampler, ClassObjective, Schedule

STEPS = 60
ROUNDING = 16 * 2.0**-24
RULES = (("SGD", dict(rule="sgd", lr=0.01, momentum=0.0)),
         ("SGD, momentum 0.9", dict(rule="sgd", lr=0.001, momentum=0.9)),
         ("Adam", dict(rule="adam", lr=0.001)))
SPACES = ("gradient", "update")


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def run_one(ctx, rule: dict[str, Any], space: str, steps: int, seed: int) -> dict[str, Any]:
    model = copy.deepcopy(ctx.original.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = EUPMU(list(model.named_parameters()), mode="explicit", surgery="ungrad", tolerance=0.0,
                surgery_space=space, weight_decay=0.0, backend="torch", **rule)
    sampler = BatchSampler(ctx.scenario, ctx.data.num_classes, Schedule(), seed, None)
    objective = ClassObjective("random-label")
    changes, cosines, bounds = [], [], []
    for _ in range(steps):
        batch = sampler.draw()
        opt.zero_grad()
        explicit_backward(opt, objective.losses(model, batch))
        g_r = _flat(opt.retain_grads())
        before = _flat(params)
        opt.step()
        after = _flat(params)
        update = after - before
        change = update @ g_r
        changes.append(change)
        cosines.append(change / (update.norm() * g_r.norm()).clamp_min(1e-300))
        bounds.append(ROUNDING * (after.abs() @ g_r.abs()))
    change, cos, bound = torch.stack(changes), torch.stack(cosines), torch.stack(bounds)
    model.eval()
    return {"violations": int((change > bound).sum()), "steps": steps, "max_cos": float(cos.max()),
            "max_change": float(change.max()), "retain_acc": accuracy(model, ctx.scenario.retain),
            "forget_acc": accuracy(model, ctx.scenario.forget)}


def run(forget_class: int = 7, seed: int = 0, steps: int = STEPS,
        cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per base rule and space."""
    ctx = prepare_seed(BenchmarkConfig(dataset="digits", scenario="class", forget_class=forget_class,
                                       cache_dir=cache_dir, measure_memory=False), seed)
    rows = []
    for label, rule in RULES:
        for space in SPACES:
            rows.append({"rule": label, "lr": rule["lr"], "space": space, **run_one(ctx, rule, space, steps, seed)})
    original = ctx.original.model
    rows.append({"rule": "original model", "space": "-", "retain_acc": accuracy(original, ctx.scenario.retain),
                 "forget_acc": accuracy(original, ctx.scenario.forget)})
    return rows


def markdown(rows: list[dict[str, Any]], forget_class: int, seed: int, steps: int) -> str:
    body = []
    for r in rows:
        if "violations" not in r:
            body.append([r["rule"], "–", "–", "–", "–", f"{r['retain_acc']:.2f}", f"{r['forget_acc']:.2f}"])
            continue
        body.append([f"{r['rule']} (lr {r['lr']:g})", r["space"], f"{r['violations']} / {r['steps']}",
                     f"{r['max_cos']:+.3f}", f"{r['max_change']:+.2e}", f"{r['retain_acc']:.2f}",
                     f"{r['forget_acc']:.2f}"])
    title = (f"digits (MLP), forget class {forget_class}, seed {seed}, explicit UNGrad, tolerance 0, "
             f"random-label forget loss, {steps} steps, no weight decay")
    table = markdown_table(["base rule", "space", "steps with <Δθ, g_r> > rounding", "max cos(Δθ, g_r)",
                            "max <Δθ, g_r>", "RA after", "forget acc after"], body)
    return f"{title}\n\n{table}"
