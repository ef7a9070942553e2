"""Whole unlearning iterations with real autograd: what a user pays per step.

``eupmu-bench iteration`` times complete iterations (forward and backward passes, every copy and
zeroing, the optimizer step) of each method on one causal language model and batch, so that
allocator effects, hooks and page faults count. Methods share the model but each round builds
its optimizer afresh (outside the timing), warms it up, then times single iterations; rounds
rotate the method order so that drift on a shared machine spreads over all methods.

Reported per method: median seconds per iteration, the optimizer step's share, the price over
GradDiff (same two backward passes, both gradients summed in ``.grad``, fused AdamW) in units of
one fused AdamW step measured in the same run, minor page faults per iteration (the allocator's
cost on a CPU: fresh gradient tensors land on fresh pages), and peak tensor memory of one
iteration (``eupmu_unlearn.memory``).
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eupmu_kernels import EUPMU

from .baselines import composed_surgery_, naive_surgery_direction, unflatten_into_grads

LR, WEIGHT_DECAY = 1e-4, 1e-2


# ---------------------------------------------------------------------------------- the model


class _Block(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class CausalLM(nn.Module):
    """A Llama-shaped decoder (RMSNorm, attention, SwiGLU, untied head) in plain torch."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, _round_up(8 * d // 3, 64), heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def causal_lm(numel: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CausalLM:
    """About ``numel`` parameters: width and depth grow together, vocabulary 8192."""
    vocab, layers = 8192, 8
    d = 64
    while True:
        candidate = d + 64
        if _lm_numel(vocab, candidate, layers) > numel:
            break
        d = candidate
    torch.manual_seed(seed)
    return CausalLM(vocab, d, layers, heads=max(1, d // 64)).to(device=device, dtype=dtype)


def _lm_numel(vocab: int, d: int, layers: int) -> int:
    ffn = _round_up(8 * d // 3, 64)
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d


# ---------------------------------------------------------------------------------- iterations


@dataclass
class Batches:
    forget: Tensor  # tokens, [batch, seq]
    retain: Tensor
    labels_f: Tensor  # random next tokens for the forget side (a positive, random-label loss)


def token_batches(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randint(0, vocab, (batch, seq), generator=gen).to(device)  # noqa: E731
    return Batches(draw(), draw(), draw())


def lm_loss(model: nn.Module, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy (against ``labels`` shifted the same way when given)."""
    logits = model(tokens)[:, :-1].float()
    target = (tokens if labels is None else labels)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass
class Iteration:
    """One method: ``run()`` does a whole iteration and returns the seconds its step() took."""

    run: Callable[[], float]
    keep_alive: list[Any] = field(default_factory=list)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _forget(model: nn.Module, b: Batches) -> Tensor:
    return lm_loss(model, b.forget, b.labels_f)


def _retain(model: nn.Module, b: Batches) -> Tensor:
    return lm_loss(model, b.retain)


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


def graddiff(model: nn.Module, b: Batches) -> Iteration:
    opt = _adamw(model)

    def run() -> float:
        opt.zero_grad()
        _retain(model, b).backward()
        _forget(model, b).backward()  # accumulates into .grad: d = g_f + g_r
        return _timed(opt.step)

    return Iteration(run, [opt])


def naive(model: nn.Module, b: Batches) -> Iteration:
    """Published surgery code: copies of g_r, flatten both, host branch, unflatten, AdamW."""
    opt = _adamw(model)
    params = list(model.parameters())

    def run() -> float:
        opt.zero_grad()
        _retain(model, b).backward()
        grads_r = [p.grad.clone() for p in params]
        opt.zero_grad()
        _forget(model, b).backward()

        def step() -> None:
            unflatten_into_grads(naive_surgery_direction([p.grad for p in params], grads_r), params)
            opt.step()

        return _timed(step)

    return Iteration(run, [opt])


def _composed(model: nn.Module, b: Batches, surgery: Callable[[list[Tensor], list[Tensor]], None]) -> Iteration:
    opt = _adamw(model)
    params = list(model.parameters())

    def run() -> float:
        opt.zero_grad()
        _retain(model, b).backward()
        grads_r = [p.grad for p in params]  # kept by reference, as a careful user would
        for p in params:
            p.grad = None
        _forget(model, b).backward()

        def step() -> None:
            surgery([p.grad for p in params], grads_r)
            opt.step()

        return _timed(step)

    return Iteration(run, [opt])


def composed(model: nn.Module, b: Batches) -> Iteration:
    return _composed(model, b, composed_surgery_)


_COMPILED: dict[str, Callable] = {}


def composed_compiled(model: nn.Module, b: Batches) -> Iteration:
    """The composed surgery under torch.compile (compiled in the untimed warm-up)."""
    compiled = _COMPILED.setdefault("surgery", torch.compile(composed_surgery_, dynamic=False))
    return _composed(model, b, compiled)


def _eupmu_explicit(model: nn.Module, b: Batches, **options) -> Iteration:
    opt = EUPMU(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, rule="adamw", mode="explicit", **options)

    def run() -> float:
        opt.zero_grad()
        _retain(model, b).backward()
        opt.stash_retain_grad()
        _forget(model, b).backward()
        return _timed(opt.step)

    return Iteration(run, [opt])


def eupmu_implicit(model: nn.Module, b: Batches) -> Iteration:
    opt = EUPMU(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, rule="adamw", mode="implicit")

    def run() -> float:
        opt.zero_grad()
        opt.combine(_forget(model, b), _retain(model, b)).backward()
        return _timed(opt.step)

    return Iteration(run, [opt])


METHODS: dict[str, tuple[str, Callable[[nn.Module, Batches], Iteration]]] = {
    "graddiff": ("two backward passes summed in .grad, AdamW(fused=True): the floor", graddiff),
    "naive": ("g_r cloned, both flattened, host branch, unflattened, AdamW(fused=True)", naive),
    "composed": ("g_r by reference, _foreach Gramian, lambda on the device, _foreach combine, fused AdamW",
                 composed),
    "composed-compiled": ("the composed surgery under torch.compile, then fused AdamW", composed_compiled),
    "eupmu-explicit": ("EUPMU explicit, defaults (g_r by reference, Gramian in the backward hooks)",
                       lambda m, b: _eupmu_explicit(m, b)),
    "eupmu-explicit-instep": ("EUPMU explicit, g_r by reference, Gramian in the step",
                              lambda m, b: _eupmu_explicit(m, b, gramian_in_backward=False)),
    "eupmu-explicit-views": ("EUPMU explicit, g_r accumulated into .grad views of a zeroed buffer",
                             lambda m, b: _eupmu_explicit(m, b, retain_capture="views")),
    "eupmu-implicit": ("EUPMU implicit (one backward pass), defaults", eupmu_implicit),
}
FLOOR = "graddiff"


# ---------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class IterationConfig:
    numel: int
    dtype: torch.dtype
    device: torch.device
    batch: int = 1
    seq: int = 32
    rounds: int = 3
    iterations: int = 5  # timed per method per round
    warmup: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    memory: bool = True
    seed: int = 0


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _LogitsOnly(nn.Module):
    """A Hugging Face causal LM called like :class:`CausalLM` (tokens in, logits out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits


def smollm2(dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, int]:
    """SmolLM2-135M from the offline weights package (the LLM extra), and its vocabulary size."""
    from eupmu_unlearn.llm.model import load_smollm2

    model, _ = load_smollm2()
    model = model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    return _LogitsOnly(model), model.config.vocab_size


def run_iterations(config: IterationConfig, model: nn.Module | None = None, vocab: int | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every method; returns per-method samples and summaries (see the module docstring)."""
    if model is None:
        model = causal_lm(config.numel, config.dtype, config.device, config.seed)
        vocab = model.embed.num_embeddings
    batches = token_batches(vocab, config.batch, config.seq, config.device, config.seed)
    samples: dict[str, dict[str, list[float]]] = {m: {"iteration": [], "step": [], "faults": []}
                                                  for m in config.methods}
    for r in range(config.rounds):
        order = config.methods[r % len(config.methods):] + config.methods[:r % len(config.methods)]
        for name in order:
            if progress:
                progress(f"round {r + 1}/{config.rounds}: {name}")
            _time_method(name, model, batches, config, samples[name])
    records = [_summarise(name, samples[name]) for name in config.methods]
    floor = next((rec for rec in records if rec["method"] == FLOOR), None)
    if floor is not None:
        for rec in records:
            rec["price_over_graddiff_steps"] = (rec["iteration_ms"] - floor["iteration_ms"]) / floor["step_ms"]
    if config.memory:
        for rec in records:
            rec["peak_tensor_mib"] = _peak_memory(rec["method"], model, batches, config)
    return {"numel": sum(p.numel() for p in model.parameters()), "records": records,
            "methods": {name: METHODS[name][0] for name in config.methods}}


def _time_method(name: str, model: nn.Module, batches: Batches, config: IterationConfig,
                 out: dict[str, list[float]]) -> None:
    iteration = METHODS[name][1](model, batches)
    for _ in range(config.warmup):
        iteration.run()
    sync = torch.cuda.synchronize if config.device.type == "cuda" else (lambda: None)
    for _ in range(config.iterations):
        sync()
        faults = _minor_faults()
        start = time.perf_counter()
        step_seconds = iteration.run()
        sync()
        out["iteration"].append((time.perf_counter() - start) * 1e3)
        out["step"].append(step_seconds * 1e3)
        out["faults"].append(_minor_faults() - faults)
    del iteration
    gc.collect()


def _summarise(name: str, s: dict[str, list[float]]) -> dict[str, Any]:
    return {"method": name, "iteration_ms": statistics.median(s["iteration"]), "step_ms": statistics.median(s["step"]),
            "iteration_min_ms": min(s["iteration"]), "minor_faults": statistics.median(s["faults"]),
            "samples_ms": s["iteration"]}


def _peak_memory(name: str, model: nn.Module, batches: Batches, config: IterationConfig) -> float | None:
    """Peak tensor memory of one iteration after a warm-up one (optimizer state already allocated)."""
    from eupmu_unlearn.memory import memory_probe

    iteration = METHODS[name][1](model, batches)
    iteration.run()
    _, use = memory_probe(config.device).measure(iteration.run)
    del iteration
    gc.collect()
    return None if use is None else use.peak_mib


def format_table(result: dict[str, Any]) -> str:
    from eupmu_unlearn.tables import markdown_table

    rows = []
    for rec in result["records"]:
        price = rec.get("price_over_graddiff_steps")
        rows.append([rec["method"], f"{rec['iteration_ms']:.1f}", f"{rec['step_ms']:.2f}",
                     "" if price is None or math.isnan(price) else f"{price:+.2f}", f"{rec['minor_faults']:.0f}",
                     "" if rec.get("peak_tensor_mib") is None else f"{rec['peak_tensor_mib']:.0f}"])
    return markdown_table(["method", "iteration ms", "step ms", "price (AdamW steps)", "minor faults",
                           "peak tensor MiB"], rows)
