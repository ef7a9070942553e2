"""Protocol v2: ``eupmu-unlearn suite``, every forget class (or several random subsets) x 3 seeds.

Protocol v1 (``eupmu-unlearn sweep`` + ``run``) tunes and reports on one forget class. Protocol v2
reports over all classes and separates the data that chooses the hyperparameters from the data
the numbers are reported on:

- **Class-wise.** The classes are split into two folds, even and odd. The hyperparameters used
  for a reported class are chosen on the *other* fold's classes (its tuning classes), with the
  tuning seeds (100, 101) and the validation split; the reported runs use the reporting seeds
  (0, 1, 2) and the test split. So no reported (class, seed) pair, and no reported class or
  seed, ever took part in choosing its own hyperparameters (:meth:`Protocol.check_disjoint`).
- **Random 10%.** One fold: tuned on random forget subsets 100, 101 with the tuning seeds,
  reported on subsets 0, 1, 2 x seeds 0, 1, 2.

Every method gets the budget of protocol v1: the learning rates of ``LR_GRID`` times the three
values of its one knob (:data:`eupmu_unlearn.methods.METHODS`), each run on every tuning context
of the fold. The criterion is the mean average gap to the retrained model over the fold's tuning
contexts (ties: the earlier grid point). Besides the per-fold choices, the suite records the
*pooled* choice (all tuning contexts of the scenario), which is what it writes into a selection
file (``--selection-out``) for ``eupmu-unlearn run``.

The record keeps the layout of ``eupmu-unlearn run`` (``methods/<name>/mean/gap``,
``reference/retrain/...``; ``per_seed`` holds one entry per reported context, in the order of
``contexts``) and adds ``per_class`` statistics, the ``tuning`` grids, the ``protocol`` and the
``summary`` (mean, std, worst class per method). Standard deviations are over the reported
contexts (classes x seeds, or subsets x seeds).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..cli_args import display_path, write_text_atomic
from ..methods import EUPMU_PRESETS, LR_GRID, Hyper, Method, resolve
from .data import NUM_CLASSES
from .metrics import GAP_KEYS, mean_std
from .models import DEFAULT_ARCHITECTURE
from .runner import BenchmarkConfig, Progress, prepare_seed, run_method, run_method_lengths
from .selection import selection_key, store_entry
from .unlearning import Schedule

VERSION = 2
REPORTED_SEEDS = (0, 1, 2)
TUNING_SEEDS = (100, 101)
REPORTED_SUBSETS = (0, 1, 2)
TUNING_SUBSETS = (100, 101)
SUITE_METHODS = ("eupmu-paper", "eupmu-reference", "eupmu-length", "ungrad", "ungrad-update", "pcgrad", "graddiff", "famo", "ga",
                 "rl", "salun", "ft", "l1-sparse")
DEFAULT_SCENARIOS = {"digits": ("class",), "mnist1d": ("class", "random")}
# The default tuning budget per dataset, sized for 30 minutes on 2 cores (--jobs 2): MNIST-1D runs
# cost ~17x digits runs, so it tunes on one seed and, class-wise, on one class of the other fold.
DEFAULT_TUNING = {"digits": {"tuning_seeds": TUNING_SEEDS, "tuning_classes": None},
                  "mnist1d": {"tuning_seeds": TUNING_SEEDS[:1], "tuning_classes": 1}}
CRITERION = ("mean over the fold's tuning contexts of the average |metric - retrained| over UA, RA, TA, MIA, "
             "with the validation split in place of the test split")


@dataclass(frozen=True)
class Context:
    """One unlearning problem: a seed (data split, models, batches) and a target (the forget class,
    or the seed of the random forget subset)."""

    seed: int
    target: int

    def describe(self, scenario: str) -> dict[str, int]:
        return {"seed": self.seed, ("forget_class" if scenario == "class" else "subset"): self.target}


@dataclass(frozen=True)
class Fold:
    tuning: tuple[Context, ...]
    reported: tuple[Context, ...]

    def to_dict(self, scenario: str) -> dict[str, Any]:
        return {"tuning": [c.describe(scenario) for c in self.tuning],
                "reported": [c.describe(scenario) for c in self.reported]}


@dataclass(frozen=True)
class Protocol:
    dataset: str
    scenario: str
    folds: tuple[Fold, ...]
    methods: tuple[str, ...] = SUITE_METHODS
    lr_grid: tuple[float, ...] = LR_GRID
    epochs: int = Schedule().epochs
    train_epochs: int | None = None  # overrides the training recipe of the original/retrained models
    note: str = ""  # what differs from the full protocol (a reduced budget), for the record

    @property
    def architecture(self) -> str:
        return DEFAULT_ARCHITECTURE[self.dataset]

    @property
    def reported(self) -> tuple[Context, ...]:
        return tuple(c for fold in self.folds for c in fold.reported)

    @property
    def tuning(self) -> tuple[Context, ...]:
        """Every tuning context once, in fold order."""
        return tuple(dict.fromkeys(c for fold in self.folds for c in fold.tuning))

    def check_disjoint(self) -> None:
        """Raises unless, in every fold, the tuning seeds and targets share nothing with the reported
        ones (and every reported context is reported by exactly one fold)."""
        for i, fold in enumerate(self.folds):
            for what, pick in (("seeds", lambda c: c.seed), ("targets", lambda c: c.target)):
                shared = {pick(c) for c in fold.tuning} & {pick(c) for c in fold.reported}
                if shared:
                    raise ValueError(f"fold {i}: tuning and reported {what} overlap: {sorted(shared)}")
            if not fold.tuning or not fold.reported:
                raise ValueError(f"fold {i} needs tuning and reported contexts")
        if len(set(self.reported)) != len(self.reported):
            raise ValueError("a reported context belongs to more than one fold")

    def grid(self, method: Method) -> list[Hyper]:
        return [Hyper(lr, knob) for lr in self.lr_grid for knob in method.knob_grid]

    def runs(self) -> dict[str, int]:
        points = sum(len(self.grid(resolve(m, image=True))) for m in self.methods)
        return {"tuning_runs": points * len(self.tuning), "reported_runs": len(self.methods) * len(self.reported),
                "contexts": len(self.tuning) + len(self.reported)}

    def work_units(self) -> int:
        """Progress units: the tuning contexts, one per (method, learning rate), the reported contexts."""
        return len(self.tuning) + len(self.methods) * len(self.lr_grid) + len(self.reported)

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "dataset": self.dataset, "scenario": self.scenario,
                "architecture": self.architecture,
                "folds": [fold.to_dict(self.scenario) for fold in self.folds],
                "methods": list(self.methods), "lr_grid": list(self.lr_grid),
                "knob_grids": {m: {"knob": resolve(m, image=True).knob, "values": list(resolve(m, image=True).knob_grid)}
                               for m in self.methods},
                "epochs": self.epochs, "train_epochs": self.train_epochs, "criterion": CRITERION,
                "tuning_heldout": "val", "reported_heldout": "test", "note": self.note, **self.runs()}


def class_folds(num_classes: int, reported_seeds: Sequence[int], tuning_seeds: Sequence[int],
                tuning_classes: int | None = None, reported_classes: int | None = None) -> tuple[Fold, ...]:
    """Two folds, even and odd classes: each fold reports its classes and is tuned on (the first
    ``tuning_classes`` of) the other fold's classes. ``reported_classes`` limits the classes each
    fold reports (tiny configurations)."""
    halves = (tuple(range(0, num_classes, 2)), tuple(range(1, num_classes, 2)))
    folds = []
    for mine, other in (halves, halves[::-1]):
        tuned = other[:tuning_classes] if tuning_classes else other
        shown = mine[:reported_classes] if reported_classes else mine
        folds.append(Fold(tuple(Context(s, c) for c in tuned for s in tuning_seeds),
                          tuple(Context(s, c) for c in shown for s in reported_seeds)))
    return tuple(folds)


def random_folds(reported_seeds: Sequence[int], tuning_seeds: Sequence[int],
                 reported_subsets: Sequence[int] = REPORTED_SUBSETS,
                 tuning_subsets: Sequence[int] = TUNING_SUBSETS) -> tuple[Fold, ...]:
    return (Fold(tuple(Context(s, k) for k in tuning_subsets for s in tuning_seeds),
                 tuple(Context(s, k) for k in reported_subsets for s in reported_seeds)),)


def make_protocol(dataset: str, scenario: str, *, methods: Sequence[str] = SUITE_METHODS,
                  reported_seeds: Sequence[int] = REPORTED_SEEDS, tuning_seeds: Sequence[int] = TUNING_SEEDS,
                  tuning_classes: int | None = None, reported_classes: int | None = None,
                  tuning_subsets: Sequence[int] = TUNING_SUBSETS, reported_subsets: Sequence[int] = REPORTED_SUBSETS,
                  lr_grid: Sequence[float] = LR_GRID, epochs: int = Schedule().epochs,
                  train_epochs: int | None = None, note: str = "") -> Protocol:
    if scenario == "class":
        folds = class_folds(NUM_CLASSES[dataset], reported_seeds, tuning_seeds, tuning_classes, reported_classes)
    elif scenario == "random":
        folds = random_folds(reported_seeds, tuning_seeds, reported_subsets, tuning_subsets)
    else:
        raise ValueError(f"scenario must be class or random, got {scenario!r}")
    protocol = Protocol(dataset, scenario, folds, tuple(resolve(m, image=True).name for m in methods), tuple(lr_grid), epochs,
                        train_epochs, note)
    protocol.check_disjoint()
    return protocol


# ---------------------------------------------------------------------------------- running it


def _bench(protocol: Protocol, context: Context, heldout: str, cache_dir: Path | None, device: str) -> BenchmarkConfig:
    target = dict(forget_class=context.target) if protocol.scenario == "class" else dict(subset=context.target)
    return BenchmarkConfig(dataset=protocol.dataset, scenario=protocol.scenario, seeds=(context.seed,),
                           methods=protocol.methods, train_epochs=protocol.train_epochs,
                           schedule=Schedule(epochs=protocol.epochs), cache_dir=cache_dir, device=device,
                           heldout=heldout, measure_memory=False, trace_points=0, **target)


def _metrics(outcome_metrics) -> dict[str, float]:
    return {k: round(float(getattr(outcome_metrics, k)), 4) for k in (*GAP_KEYS, "gap")}


_PREPARED: dict[tuple[Context, str], Any] = {}  # per process: contexts prepared so far (models come from the cache)


def _prepared(protocol: Protocol, context: Context, heldout: str, cache_dir: Path | None, device: str):
    key = (context, heldout)
    if key not in _PREPARED:
        _PREPARED[key] = prepare_seed(_bench(protocol, context, heldout, cache_dir, device), context.seed)
    return _PREPARED[key]


def _tune_item(protocol: Protocol, name: str, lr: float, cache_dir: Path | None,
               device: str) -> dict[float, list[dict[str, float]]]:
    """One method at one learning rate on every tuning context: knob value -> metrics per context."""
    spec = resolve(name, image=True)
    runs: dict[float, list[dict[str, float]]] = {k: [] for k in spec.knob_grid}
    for c in protocol.tuning:
        ctx = _prepared(protocol, c, "val", cache_dir, device)
        bench = _bench(protocol, c, "val", cache_dir, device)
        if spec.knob == "epochs":  # one run of the longest length, evaluated on the way
            for k, metrics in run_method_lengths(ctx, spec, lr, spec.knob_grid, bench).items():
                runs[k].append(_metrics(metrics))
        else:
            for k in spec.knob_grid:
                runs[k].append(_metrics(run_method(ctx, spec, Hyper(lr, k), bench).metrics))
    return runs


def _report_item(protocol: Protocol, context: Context, picks: dict[str, dict[str, Any]], cache_dir: Path | None,
                 device: str) -> dict[str, dict[str, Any]]:
    """Every method on one reported context with its fold's choice (and the reference models)."""
    ctx = _prepared(protocol, context, "test", cache_dir, device)
    bench = _bench(protocol, context, "test", cache_dir, device)
    out = {"retrain": ctx.retrain_metrics.to_dict(), "original": ctx.original_metrics.to_dict()}
    for name in protocol.methods:
        pick = picks[name]
        out[name] = run_method(ctx, resolve(name, image=True), Hyper(pick["lr"], pick["knob"]), bench).metrics.to_dict()
    _PREPARED.pop((context, "test"), None)
    return out


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _map(jobs: int, function, items: Sequence[tuple], progress: Progress | None, labels: Sequence[str]) -> list:
    """``function(*item)`` for every item, in order: here, or in ``jobs`` spawned worker processes
    (each single-threaded; every worker loads the cached models it needs itself)."""
    if jobs <= 1:
        results = []
        for item, label in zip(items, labels):
            _tell(progress, label)
            results.append(function(*item))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(1,)) as pool:
        futures = [pool.submit(function, *item) for item in items]
        results = []
        for future, label in zip(futures, labels):
            results.append(future.result())
            _tell(progress, label)
        return results


def tune(protocol: Protocol, cache_dir: Path | None, device: str = "cpu", progress: Progress | None = None,
         jobs: int = 1) -> dict[str, Any]:
    """Every method's grid on every tuning context: per point, the metrics of each context."""
    for c in protocol.tuning:  # trained (and cached) once, here, before any worker needs them
        _tell(progress, f"tuning context {c.describe(protocol.scenario)}: models")
        _prepared(protocol, c, "val", cache_dir, device)
    items = [(protocol, name, lr, cache_dir, device) for name in protocol.methods for lr in protocol.lr_grid]
    labels = [f"tune {name} lr={lr:g}" for name in protocol.methods for lr in protocol.lr_grid]
    results = iter(_map(jobs, _tune_item, items, progress, labels))
    grids: dict[str, list[dict[str, Any]]] = {}
    for name in protocol.methods:
        points = []
        for lr in protocol.lr_grid:
            runs = next(results)
            points.extend({"lr": lr, "knob": k, "runs": runs[k]} for k in resolve(name, image=True).knob_grid)
        grids[name] = points
    return grids


def choose(protocol: Protocol, grids: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: the point with the smallest mean gap over each fold's tuning contexts, and pooled."""
    order = {c: i for i, c in enumerate(protocol.tuning)}
    chosen: dict[str, Any] = {}
    for name, points in grids.items():
        spec = resolve(name, image=True)

        def best(contexts: Sequence[Context]) -> dict[str, Any]:
            scored = [(float(np.mean([p["runs"][order[c]]["gap"] for c in contexts])), i) for i, p in enumerate(points)]
            gap, i = min(scored)  # ties: the earlier grid point
            return {"lr": points[i]["lr"], "knob_name": spec.knob, "knob": points[i]["knob"], "val_gap": round(gap, 4)}

        chosen[name] = {"folds": [best(fold.tuning) for fold in protocol.folds], "pooled": best(protocol.tuning)}
    return chosen


def report(protocol: Protocol, chosen: dict[str, Any], cache_dir: Path | None, device: str = "cpu",
           progress: Progress | None = None, jobs: int = 1) -> dict[str, Any]:
    """Every method on every reported context with its fold's choice; the record (module docstring)."""
    contexts = [c for fold in protocol.folds for c in fold.reported]
    items = [(protocol, c, {name: chosen[name]["folds"][f] for name in protocol.methods}, cache_dir, device)
             for f, fold in enumerate(protocol.folds) for c in fold.reported]
    labels = [f"report {c.describe(protocol.scenario)}" for c in contexts]
    results = _map(jobs, _report_item, items, progress, labels)
    per_context = {name: [r[name] for r in results] for name in ("retrain", "original", *protocol.methods)}
    scenario = protocol.scenario
    reference = {"retrain": _row("Retrain (gold standard)", "reference", None, "", per_context["retrain"]),
                 "original": _row("Original (no unlearning)", "reference", None, "", per_context["original"])}
    methods = {}
    for name in protocol.methods:
        spec = resolve(name, image=True)
        hyper = [{"lr": pick["lr"], spec.knob or "knob": pick["knob"]} for pick in chosen[name]["folds"]]
        row = _row(spec.label, spec.family, hyper, f"protocol v{VERSION}: tuned per fold on its tuning contexts "
                   "(validation split)", per_context[name])
        row["per_target"] = _per_target(contexts, per_context[name], scenario)
        methods[name] = row
    return {"contexts": [c.describe(scenario) for c in contexts], "reference": reference, "methods": methods}


def _per_target(contexts: Sequence[Context], runs: Sequence[dict[str, Any]], scenario: str) -> dict[str, Any]:
    """Mean and std over seeds per forget class (or subset)."""
    out = {}
    for target in dict.fromkeys(c.target for c in contexts):
        mean, std = mean_std([r for c, r in zip(contexts, runs) if c.target == target])
        keys = (*GAP_KEYS, "gap")
        out[str(target)] = {"mean": {k: mean[k] for k in keys}, "std": {k: std[k] for k in keys}}
    return out


def _row(label: str, kind: str, hyper: Any, source: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    mean, std = mean_std(runs)
    return {"label": label, "kind": kind, "hyper": hyper, "hyper_source": source, "per_seed": list(runs),
            "mean": mean, "std": std}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """Per method: mean and std of the gap over the reported contexts, the worst target's mean gap;
    the best method; the EUPMU preset and the surgery space of UNGrad that the tuning contexts pick
    (smallest pooled tuning gap; the reported runs play no part in either)."""
    rows = {}
    for name, row in record["methods"].items():
        targets = row["per_target"]
        worst = max(targets, key=lambda t: targets[t]["mean"]["gap"])
        rows[name] = {"gap": row["mean"]["gap"], "gap_std": row["std"]["gap"],
                      "worst_target": int(worst), "worst_gap": targets[worst]["mean"]["gap"]}
    best = min(rows, key=lambda n: rows[n]["gap"])
    presets = [n for n in EUPMU_PRESETS if n in record["chosen"]]
    picked = min(presets, key=lambda n: record["chosen"][n]["pooled"]["val_gap"]) if presets else None
    spaces = {"gradient": "ungrad", "update": "ungrad-update"}
    space = None
    if all(n in record["chosen"] for n in spaces.values()):
        space = min(spaces, key=lambda s: record["chosen"][spaces[s]]["pooled"]["val_gap"])
    return {"methods": rows, "best": best, "eupmu_default_by_tuning": picked, "ungrad_space_by_tuning": space}


def run_suite(protocol: Protocol, cache_dir: Path | None, device: str = "cpu",
              progress: Progress | None = None, jobs: int = 1) -> dict[str, Any]:
    """Tune, choose, report; ``jobs`` > 1 spreads the work over that many worker processes (the
    models are trained and cached first, so workers only load them)."""
    start = time.perf_counter()
    grids = tune(protocol, cache_dir, device, progress, jobs)
    chosen = choose(protocol, grids)
    tuned = time.perf_counter() - start
    reported = report(protocol, chosen, cache_dir, device, progress, jobs)
    config = {"dataset": protocol.dataset, "scenario": protocol.scenario, "architecture": protocol.architecture,
              "seeds": sorted({c.seed for c in protocol.reported}), "protocol_version": VERSION,
              "cache_dir": display_path(cache_dir), "device": device, "jobs": jobs}
    what = ("class-wise forgetting of every class" if protocol.scenario == "class"
            else f"random forgetting of 10% of the training set, subsets "
                 f"{sorted({c.target for c in protocol.reported})}")
    record = {"config": config, "scenario": what, "protocol": protocol.to_dict(), **reported, "chosen": chosen,
              "tuning": {name: [{k: p[k] for k in ("lr", "knob")} | {
                  "val_gap": [round(float(np.mean([p["runs"][i]["gap"] for i, c in enumerate(protocol.tuning)
                                                   if c in fold.tuning])), 4) for fold in protocol.folds]}
                  for p in points] for name, points in grids.items()},
              "seconds": {"tuning": round(tuned, 1), "total": round(time.perf_counter() - start, 1)}}
    record["summary"] = summary(record)
    return record


def selection_entry(protocol: Protocol, record: dict[str, Any], command: str) -> dict[str, Any]:
    """The pooled choices as a selection-file entry (the layout ``eupmu-unlearn sweep`` writes)."""
    methods = {name: {**choice["pooled"], "command": command} for name, choice in record["chosen"].items()}
    return {"seeds": sorted({c.seed for c in protocol.tuning}), "protocol_version": VERSION,
            "tuning_targets": sorted({c.target for c in protocol.tuning}),
            "forget_class": None, "heldout": "val", "criterion": CRITERION.replace("the fold's", "all"),
            "lr_grid": list(protocol.lr_grid), "schedule": {"epochs": protocol.epochs}, "methods": methods}


# ---------------------------------------------------------------------------------- outputs


def markdown_summary(record: dict[str, Any]) -> str:
    from ..tables import markdown_table

    rows = record["summary"]["methods"]
    best = record["summary"]["best"]
    target = "worst class" if record["config"]["scenario"] == "class" else "worst subset"
    body = []
    for name, row in record["methods"].items():
        s = rows[name]
        gap = f"{s['gap']:.2f} ± {s['gap_std']:.2f}"
        cells = [f"{row['label']} (`{name}`)", f"**{gap}**" if name == best else gap,
                 f"{s['worst_gap']:.2f} ({s['worst_target']})",
                 *(f"{row['mean'][k]:.2f}" for k in GAP_KEYS)]
        body.append(cells)
    gold = record["reference"]["retrain"]["mean"]
    body.append(["Retrain (gold standard)", "0", "–", *(f"{gold[k]:.2f}" for k in GAP_KEYS)])
    return markdown_table(["Method", "Avg. gap ↓ (mean ± std)", f"{target} (gap)", "UA", "RA", "TA", "MIA"], body)


def combined_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per method, one column per suite record: mean ± std of the gap (worst target, its
    gap); the smallest mean gap of each column in bold, a method a record did not run as "–"."""
    from ..tables import markdown_table

    names = list(dict.fromkeys(n for r in records for n in r["methods"]))
    header = ["Avg. gap ↓ (worst)"]
    for r in records:
        cfg = r["config"]
        seeds = ",".join(map(str, cfg["seeds"]))
        header.append(f"{cfg['dataset']}, {'class-wise' if cfg['scenario'] == 'class' else 'random 10%'} "
                      f"(seeds {seeds})")
    body = []
    for name in names:
        label = next(r["methods"][name]["label"] for r in records if name in r["methods"])
        cells = [f"{label} (`{name}`)"]
        for r in records:
            s = r["summary"]["methods"].get(name)
            if s is None:
                cells.append("–")
                continue
            text = f"{s['gap']:.2f} ± {s['gap_std']:.2f} ({s['worst_target']}: {s['worst_gap']:.2f})"
            cells.append(f"**{text}**" if r["summary"]["best"] == name else text)
        body.append(cells)
    return markdown_table(header, body)


def is_suite_record(record: dict[str, Any]) -> bool:
    return isinstance(record.get("protocol"), dict) and "summary" in record


def plot_gaps(record: dict[str, Any], path: Path) -> Path:
    """Left: per method, a box of the per-target mean gaps (targets as dots); right: the per-target
    mean gap of every method as a heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    names = list(record["methods"])
    targets = sorted(record["methods"][names[0]]["per_target"], key=int)
    table = np.array([[record["methods"][n]["per_target"][t]["mean"]["gap"] for t in targets] for n in names])
    fig, (box, heat) = plt.subplots(1, 2, figsize=(17, 0.45 * len(names) + 2.5),
                                    gridspec_kw={"width_ratios": [1, 1.2]})
    box.boxplot(table.T, orientation="horizontal", tick_labels=names, showfliers=False)
    for i, values in enumerate(table):
        box.plot(values, np.full(len(values), i + 1), ".", color="tab:blue", alpha=0.6)
    box.set_xscale("symlog", linthresh=1.0)
    box.invert_yaxis()
    kind = "class" if record["config"]["scenario"] == "class" else "subset"
    box.set_xlabel(f"avg. gap to the retrained model, mean over seeds per {kind} (symlog)")
    box.grid(alpha=0.3, axis="x")
    shown = np.minimum(table, 10.0)
    image = heat.imshow(shown, aspect="auto", cmap="viridis_r")
    heat.set_xticks(range(len(targets)), targets)
    heat.set_yticks(range(len(names)), names)
    heat.set_xlabel(f"forget {kind}")
    for i in range(len(names)):
        for j in range(len(targets)):
            heat.text(j, i, f"{table[i, j]:.1f}" if table[i, j] < 10 else f"{table[i, j]:.0f}", ha="center",
                      va="center", fontsize=7, color="white" if shown[i, j] > 5 else "black")
    fig.colorbar(image, ax=heat, label="avg. gap (clipped at 10)")
    cfg = record["config"]
    fig.suptitle(f"{cfg['dataset']} ({cfg['architecture']}): {record['scenario']}, seeds {cfg['seeds']}, "
                 f"protocol v{cfg['protocol_version']}")
    return save_figure(fig, path, dpi=110)


def write(record: dict[str, Any], out: Path, plot: bool = True) -> list[Path]:
    from ..cli_args import atomic_path

    cfg = record["config"]
    stem = f"suite_{cfg['dataset']}_{cfg['scenario']}"
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(out / f"{stem}.json", json.dumps(record, indent=1) + "\n"),
               write_text_atomic(out / f"{stem}.md", markdown_summary(record) + "\n")]
    if plot:
        png = out / f"{stem}_gaps.png"
        with atomic_path(png) as tmp:
            plot_gaps(record, tmp)
        written.append(png)
    return written


def store_selection(path: Path, protocol: Protocol, record: dict[str, Any], command: str) -> str:
    key = selection_key(protocol.dataset, protocol.scenario, protocol.architecture)
    store_entry(path, key, selection_entry(protocol, record, command), {})
    return key


def _tell(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)

