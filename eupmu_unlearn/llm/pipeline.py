"""The end-to-end LLM unlearning benchmark on mini-TOFU.

Two base models: SmolLM2-135M-Instruct (``model="smollm2"``, from the GGUF file) and a tiny
offline Llama (``model="tiny"``: a few hundred thousand parameters, word-level codec over the
data's own words, "pre-trained" on the world facts from the seed), which runs several seeds and
the hyperparameter search on two CPU cores in minutes.

1. generate the data (forget / retain authors, world facts) from the seed and the split;
2. check that the pretrained model knows the world facts;
3. fine-tune the target (all authors) and the oracle (retain authors only), cached on disk; both
   also rehearse the pretrained model's own answers to a few general questions, which keeps
   the fine-tuning from overwriting its world knowledge;
4. unlearn the forget authors from the target with each method, timing it and measuring its peak
   tensor memory (:mod:`eupmu_unlearn.memory`);
5. score every model (TOFU metrics, forget quality against the oracle) and write
   ``results.json``, ``table.md`` and ``tradeoff.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..memory import FIELD as MEMORY_FIELD
from ..memory import PROBE_STEPS, peak_tensor_mib
from ..methods import DEFAULT_DUAL
from . import tofu
from .codec import ChatCodec, Codec, WordCodec
from .data import REHEARSAL_QUESTIONS, MiniTofu, QAItem, check_split, make_mini_tofu, rehearsal_item
from .model import (BASE_NAME, default_cache_dir, fingerprint, force_offline, is_cached, load_model, load_smollm2,
                    parameter_count, save_model, tiny_llama)
from .scoring import greedy_answers, score_split
from .trainer import through_trainer, unlearn_with_trainer
from .training import METHODS, FinetuneConfig, UnlearnConfig, UnlearnTrace, finetune, resolve, unlearn

SAMPLES_PER_SPLIT = 4
MODELS = ("smollm2", "tiny")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TinyModelConfig:
    """The tiny offline Llama: its size and its "pre-training" on the world facts."""

    hidden_size: int = 128
    layers: int = 2
    pretrain_epochs: int = 40
    pretrain_lr: float = 3e-3


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 0
    model: str = "smollm2"
    split: str = "test"
    n_authors: int = 20
    forget_fraction: float = 0.1
    n_perturbed: int = 4
    n_world: int | None = None
    retain_eval_size: int = 20
    n_rehearsal: int = 16
    max_new_tokens: int = 24
    eval_batch_size: int = 16
    methods: tuple[str, ...] = METHODS
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    threads: int | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config(seed: int = 0, model: str = "smollm2") -> PipelineConfig:
    if model == "tiny":
        return tiny_config(seed)
    check_model(model)
    return PipelineConfig(seed=seed, finetune=FinetuneConfig(seed=seed), unlearn=UnlearnConfig(seed=seed))


def check_model(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return model


TINY_UNLEARN = dict(steps=20, lr=3e-4)  # the shared defaults; methods' own values: tuned_tiny()
# both dual presets of the implicit mode, and UNGrad in both surgery spaces
TINY_METHODS = ("ga", "graddiff", "npo", "npo-graddiff", "simnpo", "eupmu-reference", "eupmu-paper", "ungrad",
                "ungrad-update")


def _tuned_tiny_file() -> dict[str, Any]:
    import json
    from importlib import resources

    path = resources.files("eupmu_unlearn") / "data" / "llm_tiny_tuned.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tuned_tiny() -> dict[str, dict[str, Any]]:
    """The tiny model's per-method values chosen on the validation split (package data), or none."""
    return {name: dict(values) for name, values in _tuned_tiny_file().get("per_method", {}).items()}


def tuned_tiny_dual() -> str:
    """The dual preset that ``eupmu`` names on the tiny model: the validation split's choice
    (:func:`eupmu_unlearn.llm.tuning.choose_dual`), else the optimizer's default."""
    return _tuned_tiny_file().get("eupmu_dual") or DEFAULT_DUAL


def tiny_config(seed: int = 0) -> PipelineConfig:
    """The tiny offline Llama on the full-sized mini-TOFU task (20 authors, 2 forgotten)."""
    return PipelineConfig(
        seed=seed, model="tiny", n_rehearsal=0, max_new_tokens=24, methods=TINY_METHODS,
        finetune=FinetuneConfig(epochs=40, batch_size=8, lr=3e-3, warmup_steps=10, seed=seed),
        unlearn=UnlearnConfig(seed=seed, **TINY_UNLEARN, dual=tuned_tiny_dual(), per_method=tuned_tiny()))


def quick_config(seed: int = 0, model: str = "smollm2") -> PipelineConfig:
    """A CI-sized run: 6 authors (one forgotten), short fine-tuning, three methods, three steps."""
    if check_model(model) == "tiny":
        return dataclasses.replace(tiny_config(seed), n_authors=6, forget_fraction=0.17, n_perturbed=3, n_world=3,
                                   retain_eval_size=5, max_new_tokens=16, methods=("ga", "eupmu", "ungrad"))
    return PipelineConfig(
        seed=seed, n_authors=6, forget_fraction=0.17, n_perturbed=3, n_world=3, retain_eval_size=5, n_rehearsal=4,
        max_new_tokens=16, methods=("ga", "eupmu", "ungrad"),
        finetune=FinetuneConfig(epochs=3, batch_size=8, lr=5e-4, warmup_steps=2, seed=seed),
        unlearn=UnlearnConfig(steps=3, forget_batch_size=5, retain_batch_size=5, seed=seed))


@dataclass
class BaseModel:
    """The model every run starts from, its codec, and its name (part of the cache keys)."""

    model: torch.nn.Module
    codec: Codec
    name: str


def load_base(cache_dir: Path) -> BaseModel:
    model, tokenizer = load_smollm2(cache_dir)
    return BaseModel(model=model, codec=ChatCodec(tokenizer), name=BASE_NAME)


def data_texts(data: MiniTofu) -> list[str]:
    return [t for it in data.train + data.world for t in (it.question, it.answer, it.paraphrase, *it.perturbed)]


def tiny_base(data: MiniTofu, cfg: PipelineConfig) -> BaseModel:
    """A tiny Llama over the data's words, trained on the world facts (its "pre-trained" knowledge)."""
    codec = WordCodec(data_texts(data))
    t = cfg.tiny
    model = tiny_llama(codec.vocab_size, seed=cfg.seed, hidden_size=t.hidden_size, layers=t.layers)
    finetune(model, codec, data.world, FinetuneConfig(epochs=t.pretrain_epochs, batch_size=8, lr=t.pretrain_lr,
                                                      warmup_steps=2, seed=cfg.seed))
    name = f"tiny-llama-{fingerprint(dataclasses.asdict(t), cfg.seed, codec.vocab)}"
    return BaseModel(model=model, codec=codec, name=name)


def make_data(cfg: PipelineConfig) -> MiniTofu:
    return make_mini_tofu(cfg.seed, cfg.n_authors, cfg.forget_fraction, cfg.n_perturbed, cfg.n_world, cfg.split)


def retain_eval_items(data: MiniTofu, size: int) -> tuple[QAItem, ...]:
    """An evenly spread subset of the retain split for evaluation (all of it when size >= len)."""
    if size >= len(data.retain):
        return data.retain
    stride = len(data.retain) / size
    return tuple(data.retain[int(i * stride)] for i in range(size))


def finetuned(base: BaseModel, which: str, items: Sequence[QAItem], cfg: PipelineConfig, cache_dir: Path,
              progress: Progress) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fine-tuned ``which`` model ("target" or "oracle"), from the cache when it is there."""
    key = fingerprint(base.name, parameter_count(base.model), cfg.finetune, [dataclasses.astuple(it) for it in items])
    folder = cache_dir / f"{base.name}-{which}-{key}"
    if is_cached(folder):
        progress(f"{which}: cached ({folder.name})")
        model = load_model(folder).to(next(base.model.parameters()).device)
        return model, {"cached": True, "seconds": 0.0, "folder": folder.name}
    progress(f"{which}: fine-tuning on {len(items)} questions, {cfg.finetune.epochs} epochs")
    model = copy.deepcopy(base.model)
    start = time.perf_counter()
    losses = finetune(model, base.codec, items, cfg.finetune, progress)
    seconds = time.perf_counter() - start
    save_model(model, folder)
    return model, {"cached": False, "seconds": seconds, "folder": folder.name, "final_loss": losses[-1],
                   "steps": len(losses)}


@dataclass
class Evaluation:
    scores: dict[str, tofu.SplitScores]
    seconds: float


def evaluate(model: torch.nn.Module, codec: Codec, splits: dict[str, Sequence[QAItem]],
             cfg: PipelineConfig) -> Evaluation:
    start = time.perf_counter()
    scores = {name: score_split(model, codec, items, cfg.max_new_tokens, cfg.eval_batch_size)
              for name, items in splits.items()}
    return Evaluation(scores=scores, seconds=time.perf_counter() - start)


def metrics_of(evaluation: Evaluation, oracle_ratios: Sequence[float] | None) -> tofu.ModelMetrics:
    s = evaluation.scores
    return tofu.summarise(s["forget"], s["retain"], s["world"], oracle_ratios)


def rehearsal_set(base: BaseModel, cfg: PipelineConfig, data: MiniTofu | None = None) -> tuple[QAItem, ...]:
    """The pretrained model's own first-sentence answers to general questions (see REHEARSAL_QUESTIONS);
    for the tiny model, whose "pre-training" was the world facts, those facts themselves."""
    if cfg.model == "tiny" and data is not None:
        return tuple(rehearsal_item(it.question, it.answer) for it in data.world)
    questions = REHEARSAL_QUESTIONS[:cfg.n_rehearsal]
    if not questions:
        return ()
    answers = greedy_answers(base.model, base.codec, questions, cfg.max_new_tokens, cfg.eval_batch_size)
    return tuple(rehearsal_item(q, first_sentence(a)) for q, a in zip(questions, answers) if first_sentence(a))


def first_sentence(text: str) -> str:
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[:i + 1].strip()
    return text.strip()


def world_check(base: BaseModel, world: Sequence[QAItem], cfg: PipelineConfig) -> dict[str, Any]:
    """Does the pretrained model state the world facts? (greedy answers containing the key)."""
    scores = score_split(base.model, base.codec, world, cfg.max_new_tokens, cfg.eval_batch_size)
    hits = [tofu.key_hit(k, g) for k, g in zip(scores.keys, scores.generations)]
    return {"known": int(sum(hits)), "total": len(hits),
            "answers": [{"question": it.question, "key": it.key, "generation": g, "known": h}
                        for it, g, h in zip(world, scores.generations, hits)]}


def run_pipeline(cfg: PipelineConfig, out_dir: Path | None, cache_dir: Path | None = None,
                 base: BaseModel | None = None, progress: Progress = print) -> dict[str, Any]:
    """Run everything; write results under ``out_dir`` (skipped when None) and return the record."""
    force_offline()
    check_model(cfg.model)
    check_split(cfg.split)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for name in cfg.methods:  # every name must be known before any work
        resolve(through_trainer(name) or name, cfg.unlearn)
        cfg.unlearn.for_method(name)
    t_start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = make_data(cfg)
    if base is None and cfg.model == "tiny":
        progress("building the tiny Llama and training it on the world facts")
        base = tiny_base(data, cfg)
    elif base is None:
        progress("loading SmolLM2-135M-Instruct from the GGUF file (cached as safetensors after the first run)")
        base = load_base(cache)
    device = next(base.model.parameters()).device
    splits = {"forget": data.forget, "retain": retain_eval_items(data, cfg.retain_eval_size), "world": data.world}
    record: dict[str, Any] = {"config": cfg.to_dict(), "environment": environment(base, device),
                              "data": data_summary(data, splits)}
    progress(f"data: {len(data.forget)} forget / {len(data.retain)} retain questions, "
             f"{len(data.world)} world facts; forget authors {', '.join(data.forget_authors)}")
    record["pretrained_world_check"] = world_check(base, data.world, cfg)
    progress(f"pretrained model states {record['pretrained_world_check']['known']}/{len(data.world)} world facts")

    rehearsal = rehearsal_set(base, cfg, data)
    record["rehearsal"] = [{"question": it.question, "answer": it.answer} for it in rehearsal]
    target, record["target_finetune"] = finetuned(base, "target", data.train + rehearsal, cfg, cache, progress)
    oracle, record["oracle_finetune"] = finetuned(base, "oracle", data.retain + rehearsal, cfg, cache, progress)
    codec = base.codec
    del base

    progress("scoring the oracle and the target")
    oracle_eval = evaluate(oracle, codec, splits, cfg)
    del oracle
    oracle_ratios = tofu.split_metrics(oracle_eval.scores["forget"], "forget").truth_ratios
    models: dict[str, Any] = {"oracle": model_entry(oracle_eval, oracle_ratios),
                              "target": model_entry(evaluate(target, codec, splits, cfg), oracle_ratios)}
    for method in cfg.methods:
        progress(f"unlearning with {method}: {cfg.unlearn.steps} steps")
        models[method] = unlearn_and_score(method, target, codec, data, splits, oracle_ratios, cfg, device)
        m = models[method]
        progress(f"  {m['unlearn']['seconds']:.1f} s, forget quality {m['metrics']['forget_quality']:.3g}, "
                 f"model utility {m['metrics']['model_utility']:.3f}")
    record["models"] = models
    record["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None:
        from .report import write_results

        write_results(record, Path(out_dir))
    return record


def unlearn_and_score(method: str, target: torch.nn.Module, codec: Codec, data: MiniTofu,
                      splits: dict[str, Sequence[QAItem]], oracle_ratios: Sequence[float], cfg: PipelineConfig,
                      device: torch.device) -> dict[str, Any]:
    """Unlearn from a copy of the target (timed), then score the copy. The peak tensor memory is
    measured on another copy over the first :data:`~eupmu_unlearn.memory.PROBE_STEPS` steps, after
    the timed run, so the time carries no profiler cost."""
    options = cfg.unlearn.for_method(method)
    model = copy.deepcopy(target)
    start = time.perf_counter()
    trace = run_method(method, model, codec, data.forget, data.retain, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    probe_copy = copy.deepcopy(target)
    probe_options = dataclasses.replace(options, steps=min(options.steps, PROBE_STEPS))
    _, peak_mib = peak_tensor_mib(lambda: run_method(method, probe_copy, codec, data.forget, data.retain,
                                                     probe_options), device)
    del probe_copy
    entry = model_entry(evaluate(model, codec, splits, cfg), oracle_ratios)
    entry["unlearn"] = {"seconds": seconds, MEMORY_FIELD: peak_mib, "options": cfg.unlearn.per_method.get(method, {})}
    entry["trace"] = dataclasses.asdict(trace)
    return entry


def run_method(method: str, model: torch.nn.Module, codec: Codec, forget: Sequence[QAItem],
               retain: Sequence[QAItem], cfg: UnlearnConfig) -> UnlearnTrace:
    """The shared step loop, or the Hugging Face Trainer integration for the ``*-hf`` methods."""
    if through_trainer(method) is not None:
        return unlearn_with_trainer(method, model, codec, forget, retain, cfg)
    return unlearn(method, model, codec, forget, retain, cfg)


def model_entry(evaluation: Evaluation, oracle_ratios: Sequence[float]) -> dict[str, Any]:
    metrics = metrics_of(evaluation, oracle_ratios)
    return {"metrics": metrics.as_dict(), "eval_seconds": evaluation.seconds,
            "samples": {split: samples(evaluation.scores[split], SAMPLES_PER_SPLIT) for split in ("forget", "world")}}


def samples(scores: tofu.SplitScores, count: int) -> list[dict[str, str]]:
    return [{"reference": r, "generation": g} for r, g in zip(scores.references[:count], scores.generations[:count])]


def environment(base: BaseModel, device: torch.device) -> dict[str, Any]:
    import transformers

    return {"model": base.name, "parameters": parameter_count(base.model), "device": str(device),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}


def data_summary(data: MiniTofu, splits: dict[str, Sequence[QAItem]]) -> dict[str, Any]:
    return {"seed": data.seed, "forget_authors": list(data.forget_authors),
            "n_retain_authors": len(data.retain_authors), "n_forget": len(data.forget),
            "n_retain": len(data.retain), "n_world": len(data.world),
            "eval_sizes": {name: len(items) for name, items in splits.items()},
            "n_perturbed": len(data.forget[0].perturbed)}


def run_seeds(cfg: PipelineConfig, seeds: Sequence[int], out_dir: Path | None, cache_dir: Path | None = None,
              progress: Progress = print) -> dict[str, Any]:
    """The benchmark once per seed (data, fine-tuning and unlearning seed), then mean and std over seeds.

    Each seed's record goes to ``out_dir/seed-<s>/``; ``out_dir`` gets the aggregate record
    (``results.json``), its table and plot."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    start = time.perf_counter()
    records = {}
    for seed in seeds:
        progress(f"=== seed {seed} ===")
        seeded = dataclasses.replace(cfg, seed=seed, finetune=dataclasses.replace(cfg.finetune, seed=seed),
                                     unlearn=dataclasses.replace(cfg.unlearn, seed=seed))
        records[seed] = run_pipeline(seeded, None if out_dir is None else Path(out_dir) / f"seed-{seed}",
                                     cache_dir, progress=progress)
    from .report import aggregate, write_aggregate

    record = aggregate(cfg, records, time.perf_counter() - start)
    if out_dir is not None:
        write_aggregate(record, Path(out_dir))
    return record
