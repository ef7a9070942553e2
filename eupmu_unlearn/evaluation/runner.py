"""One benchmark run: for every seed, the original and retrained models, then every method.

:func:`run_benchmark` returns a JSON-ready record::

    {"config": {...}, "scenario": "...",
     "reference": {"retrain": ROW, "original": ROW},
     "methods": {"eupmu": ROW, "ungrad": ROW, ...},
     "trajectories": {"eupmu": {"seed": 0, "step": [...], "forget_acc": [...], ...}, ...}}

where ROW = {"label", "kind", "hyper", "hyper_source", "per_seed": [metrics...], "mean": {...},
"std": {...}} and metrics are :class:`~eupmu_unlearn.evaluation.metrics.UnlearningMetrics`
dictionaries (UA, RA, TA, TA_all, MIA, RTE, peak_tensor_mib, gap, ...).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..memory import PROBE_STEPS, peak_tensor_mib
from .data import ClassificationData, Scenario, Split, load_dataset, make_scenario
from ..cli_args import display_path
from ..methods import Hyper, Method, resolve
from .metrics import UnlearningMetrics, average_gap, evaluate, mean_std, member_subset
from .models import (DEFAULT_ARCHITECTURE, CachedModel, build_model, cache_key, default_recipe, load_or_train,
                     train_classifier)
from .selection import ChosenHyper, Selections, choose, selection_key
from .unlearning import Schedule, total_steps, unlearn

DEFAULT_METHODS = ("eupmu-paper", "eupmu-reference", "eupmu-length", "ungrad", "ungrad-update", "pcgrad", "graddiff", "famo", "ga",
                   "rl", "salun", "ft", "l1-sparse")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str = "digits"
    scenario: str = "class"
    forget_class: int = 0
    subset: int | None = None  # random forgetting: the seed of the forget subset (None: the run's seed)
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = DEFAULT_METHODS
    architecture: str | None = None  # default per dataset
    train_epochs: int | None = None  # overrides the training recipe of the original/retrained models
    schedule: Schedule = field(default_factory=Schedule)
    lr: float | None = None  # overrides every method's learning rate
    tolerance: float | None = None  # overrides the tolerance of the methods that have one
    selection_path: Path | None = None  # a user's selection, looked up before the package's
    cache_dir: Path | None = None  # None: models are trained and not cached
    device: str = "cpu"
    heldout: str = "test"  # "val" during hyperparameter selection
    measure_memory: bool = True
    trace_points: int = 20  # trajectory points recorded on the first seed

    @property
    def arch(self) -> str:
        return self.architecture or DEFAULT_ARCHITECTURE[self.dataset]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["architecture"] = self.arch
        out["selection_path"] = display_path(self.selection_path)
        out["cache_dir"] = display_path(self.cache_dir)
        return out


@dataclass
class SeedContext:
    """Everything one seed's method runs share."""

    seed: int
    data: ClassificationData
    scenario: Scenario
    heldout: Split
    members: Split
    original: CachedModel
    retrained: CachedModel
    retrain_metrics: UnlearningMetrics
    original_metrics: UnlearningMetrics


def prepare_seed(cfg: BenchmarkConfig, seed: int) -> SeedContext:
    """Data, scenario, and the (cached) original and retrained models of one seed."""
    device = torch.device(cfg.device)
    data = load_dataset(cfg.dataset, seed)
    subset = seed if cfg.subset is None else cfg.subset
    scenario = make_scenario(data, cfg.scenario, cfg.forget_class, subset)
    recipe = default_recipe(cfg.dataset, cfg.arch)
    if cfg.train_epochs is not None:
        recipe = replace(recipe, epochs=cfg.train_epochs)
    common = dict(dataset=cfg.dataset, architecture=cfg.arch, seed=seed, recipe=asdict(recipe), data_version=1)

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(cfg.arch, data.input_shape, data.num_classes)

    original = load_or_train(cfg.cache_dir, cache_key(role="original", **common), make,
                             lambda m: train_classifier(m, data.train, recipe, seed))
    scenario_fields = dict(scenario=cfg.scenario, forget_class=scenario.forget_class)
    if cfg.scenario == "random" and subset != seed:  # (runs whose subset is their seed keep their cache keys)
        scenario_fields["subset"] = subset
    retrained = load_or_train(cfg.cache_dir, cache_key(role="retrain", **common, **scenario_fields), make,
                              lambda m: train_classifier(m, scenario.retain, recipe, seed))
    for cached in (original, retrained):
        cached.model.to(device)
    scenario = _scenario_to(scenario, device)
    heldout = (data.test if cfg.heldout == "test" else data.val).to(device)
    members = member_subset(scenario.retain, len(heldout), seed)
    retrain_metrics = evaluate(retrained.model, scenario, heldout, members)
    retrain_metrics.RTE, retrain_metrics.gap = retrained.train_seconds, 0.0
    original_metrics = evaluate(original.model, scenario, heldout, members)
    original_metrics.RTE = original.train_seconds
    original_metrics.gap = average_gap(original_metrics, retrain_metrics)
    return SeedContext(seed, data, scenario, heldout, members, original, retrained, retrain_metrics, original_metrics)


def _scenario_to(scenario: Scenario, device: torch.device) -> Scenario:
    return replace(scenario, forget=scenario.forget.to(device), retain=scenario.retain.to(device))


@dataclass
class MethodOutcome:
    metrics: UnlearningMetrics
    per_step: dict[str, list[float]]
    trace: dict[str, list[float]]


def run_method(ctx: SeedContext, spec: Method, hyper: Hyper, cfg: BenchmarkConfig,
               trace_points: int = 0) -> MethodOutcome:
    """Unlearn a copy of the original model with one method and evaluate it."""
    model = copy.deepcopy(ctx.original.model)
    run = unlearn(spec, hyper, model, ctx.scenario, ctx.data.num_classes, cfg.schedule, ctx.seed,
                  trace_points=trace_points)
    metrics = evaluate(run.model, ctx.scenario, ctx.heldout, ctx.members)
    metrics.RTE = run.seconds
    metrics.gap = average_gap(metrics, ctx.retrain_metrics)
    if cfg.measure_memory:
        metrics.peak_tensor_mib = _peak_memory(ctx, spec, hyper, cfg)
    return MethodOutcome(metrics, run.per_step, run.trace)


def run_method_lengths(ctx: SeedContext, spec: Method, lr: float, lengths: Sequence[float],
                       cfg: BenchmarkConfig) -> dict[float, UnlearningMetrics]:
    """A method whose knob is its length (``epochs``) at every length of ``lengths``, from one run of
    the longest: the model is copied when each shorter length is reached. The batches do not depend
    on the length and the learning rate is constant, so each copy is the model a separate run of that
    length ends with. RTE is left unset."""
    if spec.knob != "epochs":
        raise ValueError(f"method {spec.name} does not take its length as knob")
    steps = {k: total_steps(spec, Hyper(lr, k), ctx.scenario, cfg.schedule) for k in lengths}
    copies: dict[float, nn.Module] = {}

    def keep(step: int, model: nn.Module) -> None:
        for k, at in steps.items():
            if at == step:
                copies[k] = copy.deepcopy(model)

    model = copy.deepcopy(ctx.original.model)
    unlearn(spec, Hyper(lr, max(lengths)), model, ctx.scenario, ctx.data.num_classes, cfg.schedule, ctx.seed,
            on_step=keep)
    out = {}
    for k in lengths:
        trained = copies[k]
        trained.eval()
        metrics = evaluate(trained, ctx.scenario, ctx.heldout, ctx.members)
        metrics.gap = average_gap(metrics, ctx.retrain_metrics)
        out[k] = metrics
    return out


def _peak_memory(ctx: SeedContext, spec: Method, hyper: Hyper, cfg: BenchmarkConfig) -> float | None:
    """Peak tensor memory of the first few steps, on a separate copy (never inside a timed run)."""
    model = copy.deepcopy(ctx.original.model)

    def work() -> None:
        unlearn(spec, hyper, model, ctx.scenario, ctx.data.num_classes, cfg.schedule, ctx.seed,
                max_steps=PROBE_STEPS)

    return peak_tensor_mib(work, next(model.parameters()).device)[1]


def choose_all(cfg: BenchmarkConfig) -> dict[str, ChosenHyper]:
    """Each method's hyperparameters and where they came from, by the name ``cfg`` gives it."""
    selections = Selections.for_run(cfg.selection_path, display_path(cfg.selection_path))
    key = selection_key(cfg.dataset, cfg.scenario, cfg.arch)
    return {name: choose(resolve(name, image=True), selections, key, cfg.lr, cfg.tolerance) for name in cfg.methods}


def run_benchmark(cfg: BenchmarkConfig, progress: Progress | None = None) -> dict[str, Any]:
    """All seeds and methods of ``cfg``; see the module docstring for the record's layout."""
    specs = [(name, resolve(name, image=True)) for name in cfg.methods]
    chosen = choose_all(cfg)
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in ("retrain", "original", *chosen)}
    trajectories: dict[str, dict[str, Any]] = {}
    scenario_text = ""
    for i, seed in enumerate(cfg.seeds):
        _tell(progress, f"seed {seed}: original and retrained models")
        ctx = prepare_seed(cfg, seed)
        scenario_text = ctx.scenario.describe()
        per_seed["retrain"].append(ctx.retrain_metrics.to_dict())
        per_seed["original"].append(ctx.original_metrics.to_dict())
        for name, spec in specs:
            _tell(progress, f"seed {seed}: {name}")
            outcome = run_method(ctx, spec, chosen[name].hyper, cfg, cfg.trace_points if i == 0 else 0)
            per_seed[name].append(outcome.metrics.to_dict())
            if i == 0:
                trajectories[name] = {"seed": seed, **outcome.trace, **outcome.per_step}
    reference = {
        "retrain": _row("Retrain (gold standard)", "reference", None, "", per_seed["retrain"]),
        "original": _row("Original (no unlearning)", "reference", None, "", per_seed["original"]),
    }
    methods = {name: _row(spec.label, spec.family, chosen[name].hyper.describe(spec), chosen[name].source,
                          per_seed[name]) for name, spec in specs}
    return {"config": cfg.to_dict(), "scenario": scenario_text, "reference": reference, "methods": methods,
            "trajectories": trajectories}


def _row(label: str, kind: str, hyper: dict[str, Any] | None, source: str,
         runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    mean, std = mean_std(runs)
    return {"label": label, "kind": kind, "hyper": hyper, "hyper_source": source, "per_seed": list(runs),
            "mean": mean, "std": std}


def _tell(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
