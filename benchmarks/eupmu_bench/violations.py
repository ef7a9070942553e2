"""``eupmu-bench violations``: how often a step raises the retain loss beyond the budget, to first order.

Explicit UNGrad promises <d, g_r> >= -tolerance for the combined gradient d (gradient space); the
update the base rule applies, u = theta_{t+1} - theta_t, can still have <u, g_r> > lr * tolerance
once momentum, Adam's moments or weight decay act. ``surgery_space="update"`` bounds <u, g_r>
itself (docs/design.md, Update-space surgery). This tool trains a small MLP for a few unlearning
steps (gradient ascent on a forget batch, cross-entropy on a retain batch) per base rule, surgery
space, kernel backend and parameter dtype, and counts the steps whose measured first-order retain
change exceeds the budget by more than rounding explains:

    <u, g_r> > lr * tolerance + sum_i |g_r,i| * (spacing(theta'_i) + 16 * 2^-24 * (|u_i| + lr |theta_i|))

(one rounding of the stored parameter plus float32 arithmetic), with u and g_r read back in float64.
It prints a markdown table (and writes it with a JSON copy to ``--out``). On CPU tensors the
Triton backend runs in its interpreter: set ``TRITON_INTERPRET=1`` to include it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from eupmu_kernels import EUPMU, dispatch

F32_MATH = 16 * 2.0**-24
RULES = {
    "sgd-momentum": dict(rule="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": dict(rule="adam", lr=1e-2, weight_decay=0.01),
    "adamw": dict(rule="adamw", lr=1e-2, weight_decay=0.1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPACES = ("gradient", "update")


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance from |x| to the next value of ``dtype`` above it (float64)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))) * info.eps


def flat64(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def make_model(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 10)).to(dtype)


def run_case(rule: str, space: str, backend: str, dtype: torch.dtype, steps: int, tolerance: float,
             seed: int) -> dict[str, Any]:
    """Steps of one configuration; per step the measured change, the budget and the rounding bound."""
    kwargs = RULES[rule]
    model = make_model(dtype, seed)
    params = list(model.parameters())
    opt = EUPMU(params, mode="explicit", surgery_space=space, tolerance=tolerance, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    ce = torch.nn.functional.cross_entropy
    lr = kwargs["lr"]
    violations, worst = 0, float("-inf")
    for _ in range(steps):
        x_f, x_r = torch.randn(32, 20, generator=gen).to(dtype), torch.randn(64, 20, generator=gen).to(dtype)
        y_f, y_r = torch.randint(0, 10, (32,), generator=gen), torch.randint(0, 10, (64,), generator=gen)
        opt.zero_grad()
        ce(model(x_r).float(), y_r).backward()
        opt.stash_retain_grad()
        (-ce(model(x_f).float(), y_f)).backward()
        g_r = flat64(g if g is not None else torch.zeros_like(p) for g, p in zip(opt.retain_grads(), params))
        before = flat64(params)
        opt.step()
        after = flat64(params)
        u = after - before
        change = float(u @ g_r)
        rounding = float((spacing(after, dtype) + F32_MATH * (u.abs() + lr * before.abs())) @ g_r.abs())
        worst = max(worst, (change - lr * tolerance) / max(rounding, 1e-300))
        violations += int(change > lr * tolerance + rounding)
    return {"rule": rule, "space": space, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "steps": steps, "violations": violations, "worst_excess_over_rounding": worst}


def usable(backend: str, dtype: torch.dtype) -> bool:
    try:
        dispatch.get_backend(backend, torch.device("cpu"), dtype)
    except (dispatch.BackendUnavailableError, ValueError):
        return False
    return True


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| rule | surgery space | backend | dtype | steps | violations | worst (change - budget) / rounding |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['rule']} | {r['space']} | {r['backend']} | {r['dtype']} | {r['steps']} | "
                     f"{r['violations']} | {r['worst_excess_over_rounding']:.3g} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eupmu-bench violations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="unlearning steps per configuration (default 20)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of: {', '.join(RULES)}")
    p.add_argument("--spaces", default=",".join(SPACES), help="comma-separated: gradient, update")
    p.add_argument("--backends", default="torch,native,triton",
                   help="comma-separated; those that cannot run on CPU tensors here are skipped")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of: {', '.join(DTYPES)}")
    p.add_argument("--tolerance", type=float, default=0.0, help="the surgery tolerance epsilon (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="folder for violations.md and violations.json")
    return p


def _choices(parser: argparse.ArgumentParser, value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        parser.error(f"--{what}: unknown {unknown or value!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    rules = _choices(parser, args.rules, RULES, "rules")
    spaces = _choices(parser, args.spaces, SPACES, "spaces")
    backends = _choices(parser, args.backends, ("torch", "native", "triton"), "backends")
    dtypes = _choices(parser, args.dtypes, DTYPES, "dtypes")
    if args.threads:
        torch.set_num_threads(args.threads)
    records, skipped = [], []
    for rule in rules:
        for space in spaces:
            for backend in backends:
                for name in dtypes:
                    if not usable(backend, DTYPES[name]):
                        skipped.append(f"{backend}/{name}")
                        continue
                    records.append(run_case(rule, space, backend, DTYPES[name], args.steps, args.tolerance,
                                            args.seed))
    table = markdown(records)
    print(table)
    if skipped:
        print(f"\nskipped (backend cannot run on CPU tensors here): {', '.join(sorted(set(skipped)))}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "eupmu-bench violations " + shlex.join(argv)
        (args.out / "violations.md").write_text(f"command: `{command}`\n\n{table}\n")
        (args.out / "violations.json").write_text(json.dumps({"command": command, "records": records,
                                                              "skipped": sorted(set(skipped))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
