"""The registry of benchmarked methods: how to prepare each one and how many bytes it moves."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from . import bytes_model as bm
from .baselines import (PreparedStep, Settings, prepare_composed, prepare_composed_compiled, prepare_fused_adamw,
                        prepare_naive)
from .ours import prepare_explicit, prepare_implicit
from .workloads import Workload

Prepare = Callable[[Workload, "str | None", Settings], PreparedStep]

BASELINE, OURS = "baseline", "ours"
FLOOR = "adamw-fused"
NAIVE_METHODS = ("naive", "naive-clip", "naive-clip-fused")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # BASELINE runs once (torch); OURS runs once per kernel backend
    description: str
    prepare: Prepare
    bytes_per_param: Callable[[bm.StorageSizes], int]

    @property
    def per_backend(self) -> bool:
        return self.kind == OURS


def _naive(clip: bool, fused: bool) -> Prepare:
    def prepare(wl: Workload, backend: str | None, settings: Settings) -> PreparedStep:
        return prepare_naive(wl, settings, clip=clip, fused=fused)

    return prepare


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(FLOOR, BASELINE, "torch.optim.AdamW(fused=True) on g_f alone (no surgery): the floor",
           prepare_fused_adamw, bm.fused_adamw),
    Method("naive", BASELINE, "cat-flatten g_f and g_r, host `if dot < 0`, flat combine, unflatten, "
           "AdamW(foreach=True)", _naive(clip=False, fused=False), partial(bm.naive_surgery, clip=False)),
    Method("naive-clip", BASELINE, "naive + clip_grad_norm_ + AdamW(foreach=True)",
           _naive(clip=True, fused=False), partial(bm.naive_surgery, clip=True)),
    Method("naive-clip-fused", BASELINE, "naive + clip_grad_norm_ + AdamW(fused=True)",
           _naive(clip=True, fused=True), partial(bm.naive_surgery, clip=True)),
    Method("composed", BASELINE, "_foreach norms + per-tensor dots, lambda on device, _foreach combine, "
           "AdamW(fused=True)", prepare_composed, bm.composed_torch),
    Method("composed-compiled", BASELINE, "the composed surgery (Gramian, lambda, combine) under torch.compile, "
           "then AdamW(fused=True)", prepare_composed_compiled, bm.composed_torch),
    Method("eupmu-explicit", OURS, "EUPMU explicit (unilateral surgery) + adamw, Gramian formed in the backward "
           "hooks (default)", partial(prepare_explicit, clip=False), bm.explicit_surgery_hooks),
    Method("eupmu-explicit-instep", OURS, "EUPMU explicit + adamw, Gramian computed in the step",
           partial(prepare_explicit, clip=False, in_backward=False), bm.explicit_surgery),
    Method("eupmu-explicit-update", OURS, "EUPMU explicit + adamw, surgery_space='update' (the constraint on the "
           "applied update: reduction pass for the Gramian and terms, update, retain-change measurement)",
           partial(prepare_explicit, clip=False, surgery_space="update"), bm.update_space_surgery),
    Method("eupmu-explicit-clip", OURS, "EUPMU explicit + adamw, max_grad_norm (clip from the Gramian)",
           partial(prepare_explicit, clip=True), bm.explicit_surgery_hooks),
    Method("eupmu-implicit", OURS, "EUPMU implicit step (default: the non-finite guard's ||g||^2 formed in "
           "the backward hooks)", partial(prepare_implicit, guard=True),
           partial(bm.implicit_step, reduction_pass=False)),
    Method("eupmu-implicit-noguard", OURS, "EUPMU implicit step, skip_nonfinite=False (no reduction pass)",
           partial(prepare_implicit, guard=False), partial(bm.implicit_step, reduction_pass=False)),
)}


def resolve_methods(names: list[str] | None) -> list[Method]:
    if not names or names == ["all"]:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return [METHODS[n] for n in names]
