"""Unlearning a large Llama-shaped model on one machine: time, memory and the largest model that fits.

``eupmu-bench scale`` builds a causal LM from a ``transformers.LlamaConfig`` with random weights at
a requested number of parameters (bf16 weights, fp32 optimizer moments) and runs whole unlearning
iterations of each method on synthetic forget/retain token batches:

- ``adamw-torch``: GradDiff (two backward passes summed in ``.grad``), ``torch.optim.AdamW(fused=True)``.
  torch keeps the moments in the parameter dtype, so this is the bf16-moment floor.
- ``adamw``: GradDiff, AdamW with fp32 moments: EUPMU's AdamW kernel stepping ``.grad`` with no
  surgery (torch has no AdamW with fp32 moments for bf16 parameters). The floor every surgery
  method is compared with: the same moments, the same update kernel.
- ``naive``: surgery as published code writes it (retain gradient cloned, both gradients flattened
  with ``torch.cat``, host ``if dot < 0``, flat combine, cut back into fresh ``.grad`` tensors),
  then the floor's AdamW.
- ``eupmu-explicit``: ``EUPMU(mode="explicit")`` (UNGrad, retain gradient by reference, Gramian in
  the backward hooks).
- ``eupmu-implicit``: ``EUPMU(mode="implicit")``, one backward pass through J = L_f + w L_r.

The forget loss is gradient ascent (the negated next-token loss on the forget batch), the retain
loss the next-token loss on the retain batch, so the two gradients conflict and the surgery acts.

Each (size, method) runs in its own process, forked from a server process that has imported torch,
transformers and this package but allocated nothing, so that a method's memory cannot leak into
another's figure and every method starts from the same baseline. Per method it reports:

- seconds per iteration (forward + backward passes + step, median of the timed iterations) and the
  step's share of it (surgery and optimizer step: what follows the last backward pass);
- **peak process memory**: the high-water mark of the process's resident set size (``VmHWM`` in
  ``/proc/self/status``), read after the timed iterations. It counts everything the process held
  at once: weights, gradients, optimizer state, activations, temporaries, the libraries' code and
  the allocator's slack; ``start`` is the resident set size before the model was built;
- peak tensor memory (``eupmu_unlearn.memory``): the tensors alive at the start of one more
  iteration (weights, optimizer state) plus the most that iteration allocated on top of them;
- the bytes model's prediction: bytes per parameter of what is alive at once at the peak
  (docs/design.md, Bytes model, applied to memory instead of traffic), plus the start RSS;
- correctness: every loss and parameter finite; and for the methods that step through EUPMU's
  kernels, the first iteration (untimed) is checked: on a few probe slices the new weights and
  moments equal the float64 reference (``eupmu_kernels.reference``) of AdamW applied to the
  method's direction (for ``eupmu-explicit`` d = g_f + λ* g_r with λ* from the float64 Gramian
  of all parameters), the weights to bf16 rounding and the fp32 moments, (1-β1)·d and
  (1-β2)·d² after a first step, to 1e-5: the direction is checked element by element.

From the peak at the two smallest sizes it fits memory = a + b·N per method (b: measured bytes per
parameter), extrapolates the largest model that fits a given memory, and checks the extrapolation
at the largest size when more than two sizes are run. A method whose predicted peak exceeds the
memory available is skipped (and so reported) instead of started; every worker also runs under an
``RLIMIT_DATA`` of the memory available when the run began, so an allocation beyond it fails in that
process rather than waking the kernel's OOM killer on a shared machine.

The FSDP2 part (``eupmu_bench.scale_fsdp``, started by ``eupmu-bench scale`` through ``torchrun``)
steps the same model sharded over ranks and compares with the single-process step.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import resource
import statistics
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from eupmu_kernels import EUPMU, reference

from .baselines import naive_surgery_direction, unflatten_into_grads

GIB = float(2 ** 30)
PARAM_BYTES = 2  # bf16 weights and gradients
LR, WEIGHT_DECAY, BETAS, EPS = 1e-4, 1e-2, (0.9, 0.999), 1e-8
# Implicit mode's multiplier: the forget loss (gradient ascent) is negative, so no log transform;
# w starts at 1 (GradDiff's weight) and moves by the retain loss's change per step.
DUAL = dict(dual="paper", dual_lr=1.0, dual_step_scale="one", w_init=1.0, w_max=10.0)
VOCAB = 32000  # the Llama-2 tokenizer's size
HEAD_DIM = 64
ASPECT = 2048 / 22  # width / depth of TinyLlama-1.1B, the shape the search aims for
STATUS = "/proc/self/status"


# ---------------------------------------------------------------------------------- the model


def ffn_width(d: int) -> int:
    """Llama's SwiGLU width: 8d/3 rounded up to a multiple of 256."""
    return 256 * -(-int(8 * d / 3) // 256)


def llama_numel(vocab: int, d: int, layers: int) -> int:
    """Parameters of an untied Llama with multi-head attention (no biases)."""
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * ffn_width(d) + 2 * d) + d


def llama_shape(numel: int, vocab: int = VOCAB) -> tuple[int, int]:
    """(width, depth) of about ``numel`` parameters: within 5% when possible, and among those the
    width / depth ratio closest to TinyLlama's."""
    best: tuple[tuple, int, int] | None = None
    for d in range(HEAD_DIM * 2, 16384 + 1, 128):
        per_layer = 4 * d * d + 3 * d * ffn_width(d) + 2 * d
        layers = round((numel - 2 * vocab * d - d) / per_layer)
        if layers < 1:
            break
        error = abs(llama_numel(vocab, d, layers) - numel) / numel
        key = (error > 0.05, abs(math.log(d / layers / ASPECT)), error)
        if best is None or key < best[0]:
            best = (key, d, layers)
    if best is None:
        raise ValueError(f"{numel:.3g} parameters is too small for a Llama with a {vocab}-token vocabulary")
    return best[1], best[2]


def llama_config(numel: int, vocab: int = VOCAB, max_positions: int = 2048) -> LlamaConfig:
    d, layers = llama_shape(numel, vocab)
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn_width(d), num_hidden_layers=layers,
                       num_attention_heads=d // HEAD_DIM, num_key_value_heads=d // HEAD_DIM,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, use_cache=False)


def describe_config(config: LlamaConfig) -> dict[str, int]:
    return {"vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "ffn": config.intermediate_size,
            "numel": llama_numel(config.vocab_size, config.hidden_size, config.num_hidden_layers)}


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """Random weights (transformers' own initialisation), created in bf16 directly: no fp32 copy."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.train()
    return model


@dataclass
class Batches:
    forget: Tensor  # token ids [batch, seq]
    retain: Tensor


def token_batches(vocab: int, batch: int, seq: int, seed: int) -> Batches:
    """Both batches drawn from one Zipf distribution over the vocabulary (p(k) ~ 1/k, as words in
    text): the gradients share the frequent tokens' component, so gradient ascent on the forget
    batch conflicts with the retain gradient (uniform tokens give nearly orthogonal gradients)."""
    gen = torch.Generator().manual_seed(seed + 1)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)

    def draw() -> Tensor:
        return torch.multinomial(weights, batch * seq, replacement=True, generator=gen).view(batch, seq)

    return Batches(draw(), draw())


def next_token_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def forget_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Gradient ascent on the forget batch (the negated next-token loss)."""
    return -next_token_loss(model, tokens)


# ---------------------------------------------------------------------------------- the methods


class Runner:
    """One method on one model: ``backward()`` runs the passes that leave the gradients, ``step()``
    what follows them (surgery and optimizer step); ``prepare()`` is the surgery part of ``step()``
    (the check inspects the direction between the two)."""

    reference_check = True  # the update goes through EUPMU's AdamW kernel and can be checked

    def __init__(self, model: nn.Module, batches: Batches, lr: float) -> None:
        self.model, self.batches, self.lr = model, batches, lr
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = self.optimizer()

    def optimizer(self) -> torch.optim.Optimizer:
        return _plain_adamw(self.params, self.lr)

    def backward(self) -> tuple[float, float]:
        """GradDiff: the retain and the forget backward pass, both summed in ``.grad``."""
        self.opt.zero_grad()
        retain = next_token_loss(self.model, self.batches.retain)
        retain.backward()
        forget = forget_loss(self.model, self.batches.forget)
        forget.backward()
        return float(forget.detach()), float(retain.detach())

    def prepare(self) -> None:
        pass

    def step(self) -> None:
        self.prepare()
        self.opt.step()

    def direction(self, p: Tensor) -> Tensor:
        """The direction the optimizer applies to ``p`` in this step (after ``prepare``)."""
        return p.grad

    def stats(self) -> dict[str, Any]:
        return {}


def _plain_adamw(params: list[Tensor], lr: float) -> EUPMU:
    """AdamW with fp32 moments and no surgery: EUPMU's AdamW kernel on ``.grad`` (implicit mode
    without combine() applies ``.grad`` as a plain update; no guard pass)."""
    warnings.filterwarnings("ignore", message=r"EUPMU\(mode='implicit'\)\.step\(\) ran without combine")
    return EUPMU(params, lr=lr, rule="adamw", mode="implicit", betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                 skip_nonfinite=False, state_dtype=torch.float32)


class TorchAdamW(Runner):
    reference_check = False  # bf16 moments, torch's own kernel

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params, lr=self.lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                 fused=True)


class Naive(Runner):
    """Surgery as published code writes it, with the floor's optimizer."""

    def backward(self) -> tuple[float, float]:
        self.opt.zero_grad()
        retain = next_token_loss(self.model, self.batches.retain)
        retain.backward()
        self.grads_r = [p.grad.clone() for p in self.params]
        self.opt.zero_grad()
        forget = forget_loss(self.model, self.batches.forget)
        forget.backward()
        return float(forget.detach()), float(retain.detach())

    def prepare(self) -> None:
        unflatten_into_grads(naive_surgery_direction([p.grad for p in self.params], self.grads_r), self.params)
        del self.grads_r


class Explicit(Runner):
    reference_lam = 0.0  # λ* of the float64 reference, set by reference_lambda() for direction()

    def optimizer(self) -> torch.optim.Optimizer:
        return EUPMU(self.params, lr=self.lr, rule="adamw", mode="explicit", betas=BETAS, eps=EPS,
                     weight_decay=WEIGHT_DECAY, state_dtype=torch.float32)

    def backward(self) -> tuple[float, float]:
        self.opt.zero_grad()
        retain = next_token_loss(self.model, self.batches.retain)
        retain.backward()
        self.opt.stash_retain_grad()
        forget = forget_loss(self.model, self.batches.forget)
        forget.backward()
        return float(forget.detach()), float(retain.detach())

    def reference_lambda(self) -> Tensor:
        """λ* from the float64 Gramian of every parameter's g_f and g_r (computed here, in chunks);
        returns the Gramian."""
        gram = float64_gramian([p.grad for p in self.params], self.opt.retain_grads())
        self.reference_lam = reference.ungrad_lambda(gram, 0.0)
        return gram

    def direction(self, p: Tensor) -> Tensor:
        grads_r = dict(zip(map(id, self.params), self.opt.retain_grads()))
        return p.grad.double() + self.reference_lam * grads_r[id(p)].double()

    def stats(self) -> dict[str, Any]:
        s = self.opt.stats()
        return {"lambda": float(s["lambda"]), "cos": float(s["cos"]), "gramian_source": self.opt.gramian_source}


class Implicit(Runner):
    def optimizer(self) -> torch.optim.Optimizer:
        return EUPMU(self.params, lr=self.lr, rule="adamw", mode="implicit", betas=BETAS, eps=EPS,
                     weight_decay=WEIGHT_DECAY, state_dtype=torch.float32, **DUAL)

    def backward(self) -> tuple[float, float]:
        self.opt.zero_grad()
        forget = forget_loss(self.model, self.batches.forget)
        retain = next_token_loss(self.model, self.batches.retain)
        self.opt.combine(forget, retain).backward()
        return float(forget.detach()), float(retain.detach())

    def stats(self) -> dict[str, Any]:
        return {"w": float(self.opt.w)}


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    runner: type[Runner]
    # Bytes per parameter alive at once at the peak (bf16 weights and gradients), by holder.
    peak_terms: tuple[tuple[str, int], ...]

    @property
    def peak_bytes_per_param(self) -> int:
        return sum(b for _, b in self.peak_terms)


_WEIGHTS, _FP32_MOMENTS = ("weights", 2), ("fp32 moments", 8)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw-torch", "GradDiff (both gradients summed in .grad), torch.optim.AdamW(fused=True): bf16 moments",
           TorchAdamW, (_WEIGHTS, ("bf16 moments", 4), (".grad", 2))),
    Method("adamw", "GradDiff, AdamW with fp32 moments (EUPMU's AdamW kernel on .grad, no surgery): the floor",
           Runner, (_WEIGHTS, _FP32_MOMENTS, (".grad", 2))),
    Method("naive", "g_r cloned, both flattened with cat, host `if dot < 0`, flat combine, unflattened into fresh "
           ".grad, then the floor's AdamW",
           Naive, (_WEIGHTS, _FP32_MOMENTS, ("g_f", 2), ("g_r clone", 2), ("flat g_f", 2), ("flat g_r", 2),
                   ("lambda*g_r", 2), ("flat d", 2))),
    Method("eupmu-explicit", "EUPMU explicit (UNGrad), g_r by reference, Gramian in the backward hooks",
           Explicit, (_WEIGHTS, _FP32_MOMENTS, ("g_f", 2), ("g_r", 2))),
    Method("eupmu-implicit", "EUPMU implicit, one backward pass through J = L_f + w L_r (w from 1, dual 'paper')",
           Implicit, (_WEIGHTS, _FP32_MOMENTS, ("grad of J", 2))),
)}
FLOOR = "adamw"


# ---------------------------------------------------------------------------------- measuring


def process_memory() -> dict[str, int]:
    """Resident set size now and its high-water mark, and the data segment size, in bytes."""
    out: dict[str, int] = {}
    try:
        with open(STATUS) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmData"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:  # no /proc: ru_maxrss is the same high-water mark (KiB on Linux)
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def limit_data(extra_bytes: int | None) -> None:
    """Let this process's data segment grow by at most ``extra_bytes`` (RLIMIT_DATA): a larger
    allocation then fails with an error here instead of starting the OOM killer."""
    if extra_bytes is None:
        return
    limit = process_memory().get("VmData", 0) + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def float64_gramian(grads_f: list[Tensor | None], grads_r: list[Tensor | None], chunk: int = 1 << 16) -> Tensor:
    """(<f,f>, <f,r>, <r,r>) over all tensors in float64, converted a chunk at a time."""
    total = torch.zeros(3, dtype=torch.float64)
    for f, r in zip(grads_f, grads_r):
        f = None if f is None else f.reshape(-1)
        r = None if r is None else r.reshape(-1)
        n = (f if f is not None else r).numel() if (f is not None or r is not None) else 0
        for start in range(0, n, chunk):
            fc = None if f is None else f[start:start + chunk].double()
            rc = None if r is None else r[start:start + chunk].double()
            if fc is not None:
                total[0] += fc @ fc
            if fc is not None and rc is not None:
                total[1] += fc @ rc
            if rc is not None:
                total[2] += rc @ rc
    return total


def tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def held_tensors(runner: Runner) -> list[Tensor]:
    """Tensors alive between iterations: weights and buffers, gradients, optimizer state."""
    out = list(runner.model.parameters()) + list(runner.model.buffers())
    out += [p.grad for p in runner.params if p.grad is not None]
    for state in runner.opt.state.values():
        out += [v for v in state.values() if isinstance(v, Tensor)]
    return out


def probe_slices(model: LlamaForCausalLM) -> dict[str, tuple[Tensor, slice]]:
    """A few parameter slices whose update the check recomputes (rows of the big matrices)."""
    layers = model.model.layers
    rows, last = slice(0, 8), len(layers) - 1
    return {"model.embed_tokens.weight[:8]": (model.model.embed_tokens.weight, rows),
            "layers.0.self_attn.q_proj.weight[:8]": (layers[0].self_attn.q_proj.weight, rows),
            f"layers.{last}.mlp.down_proj.weight[:8]": (layers[-1].mlp.down_proj.weight, rows),
            f"layers.{last}.input_layernorm.weight": (layers[-1].input_layernorm.weight, slice(None)),
            "lm_head.weight[:8]": (model.lm_head.weight, rows)}


def bf16_spacing(x: Tensor) -> Tensor:
    """The distance between adjacent bf16 values around each element of ``x`` (float64)."""
    _, exponent = torch.frexp(x.double().abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


def check_update(runner: Runner) -> tuple[tuple[float, float], dict[str, Any]]:
    """A whole iteration whose update on the probe slices is recomputed in float64; its losses and
    the comparison. Run as the first iteration (untimed): the gradients conflict most there, and the
    optimizer state does not exist yet, so what the check holds stays far below the later peak."""
    losses = runner.backward()
    out: dict[str, Any] = {}
    if isinstance(runner, Explicit):
        out["gramian_reference"] = runner.reference_lambda().tolist()
        out["lambda_reference"] = runner.reference_lam
    runner.prepare()
    probes = probe_slices(runner.model)
    before = {}
    for name, (p, rows) in probes.items():
        st = runner.opt.state.get(p, {})
        before[name] = (p.detach()[rows].double().clone(), runner.direction(p)[rows].double().clone(),
                        int(st["step"]) if "step" in st else 0,
                        st["exp_avg"][rows].double().reshape(-1) if "exp_avg" in st else None,
                        st["exp_avg_sq"][rows].double().reshape(-1) if "exp_avg_sq" in st else None)
    runner.opt.step()
    if isinstance(runner, Explicit):
        s = runner.opt.stats()
        out["lambda"] = float(s["lambda"])
        lam = runner.reference_lam
        out["lambda_rel_error"] = abs(out["lambda"] - lam) / max(abs(lam), 1e-30)
        out["gramian"] = s["gramian"].tolist()
    worst_ratio, mismatches, state_error = 0.0, 0, 0.0
    for name, (p, rows) in probes.items():
        p0, d, step, m, v = before[name]
        st = reference.RuleState(step=step, exp_avg=m, exp_avg_sq=v)
        expected = reference.adamw_step(p0, d, st, runner.lr, BETAS[0], BETAS[1], EPS, WEIGHT_DECAY).view_as(p0)
        got = p.detach()[rows].double()
        # bf16 weights: the kernel rounds its fp32 result once, so |got - expected| <= half a spacing
        ratio = ((got - expected).abs() / (0.5 * bf16_spacing(expected))).nan_to_num(nan=math.inf).max().item()
        worst_ratio = max(worst_ratio, ratio)
        mismatches += int((got != expected.to(torch.bfloat16).double()).sum())
        state = runner.opt.state[p]
        for key, ref in (("exp_avg", st.exp_avg), ("exp_avg_sq", st.exp_avg_sq)):
            ref = ref.view_as(p0)
            scale = ref.abs().max().item() or 1.0
            error = (state[key][rows].double() - ref).abs().nan_to_num(nan=math.inf).max().item()
            state_error = max(state_error, error / scale)
    out.update({"probes": list(probes), "probe_elements": sum(before[n][0].numel() for n in probes),
                "update_error_half_spacings": worst_ratio, "rounding_mismatches": mismatches,
                "state_rel_error": state_error})
    out["passed"] = (worst_ratio <= 1.001 and state_error <= 1e-5
                     and out.get("lambda_rel_error", 0.0) <= 1e-6)
    return losses, out


@dataclass(frozen=True)
class Task:
    """One (method, size) measurement, run in its own process."""

    method: str
    numel: int
    vocab: int = VOCAB
    batch: int = 2
    seq: int = 64
    warmup: int = 1
    iterations: int = 3
    lr: float = LR
    seed: int = 0
    threads: int | None = None
    memory_limit: int | None = None  # bytes the process may add to its data segment (RLIMIT_DATA)
    tensor_memory: bool = True
    check: bool = True


def all_finite(params: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def measure(task: Task) -> dict[str, Any]:
    """Build the model, warm up, time the iterations, read the peak, then the untimed extras."""
    start = process_memory()
    limit_data(task.memory_limit)
    if task.threads:
        torch.set_num_threads(task.threads)
    config = llama_config(task.numel, task.vocab, max_positions=max(task.seq, 128))
    t0 = time.perf_counter()
    model = build_model(config, task.seed)
    build_s = time.perf_counter() - t0
    batches = token_batches(task.vocab, task.batch, task.seq, task.seed)
    method = METHODS[task.method]
    runner = method.runner(model, batches, task.lr)
    losses, iteration_s, step_s, cpu_s, stats = [], [], [], [], []
    check: dict[str, Any] | None = None
    checked = task.check and runner.reference_check
    untimed = max(task.warmup, 1 if checked else 0)
    for i in range(untimed + task.iterations):
        c0, t0 = time.process_time(), time.perf_counter()
        if i == 0 and checked:
            loss_pair, check = check_update(runner)
            losses.append(loss_pair)
            t1 = t0
        else:
            losses.append(runner.backward())
            t1 = time.perf_counter()
            runner.step()
        t2 = time.perf_counter()
        stats.append(runner.stats())
        if i >= untimed:
            iteration_s.append(t2 - t0)
            step_s.append(t2 - t1)
            cpu_s.append(time.process_time() - c0)
    peak = process_memory()
    result: dict[str, Any] = {
        "method": task.method, "numel": sum(p.numel() for p in model.parameters()), "shape": describe_config(config),
        "threads": torch.get_num_threads(), "build_s": build_s,
        "iteration_s": statistics.median(iteration_s), "step_s": statistics.median(step_s),
        "iteration_samples_s": iteration_s, "step_samples_s": step_s,
        "iteration_cpu_s": statistics.median(cpu_s),  # CPU seconds of all threads: less disturbed by other work
        "start_rss_bytes": start.get("VmRSS"), "peak_rss_bytes": peak.get("VmHWM"),
        "losses": losses, "stats": stats,
    }
    result["step_share"] = result["step_s"] / result["iteration_s"]
    if task.tensor_memory:
        from eupmu_unlearn.memory import memory_probe

        held = tensor_bytes(held_tensors(runner))
        _, use = memory_probe("cpu").measure(lambda: (runner.backward(), runner.step()))
        result["tensor_held_bytes"] = held
        result["tensor_peak_bytes"] = None if use is None else held + use.peak_bytes
    result["check"] = check
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # the whole worker: build, iterations, extras
    result["finite"] = all(math.isfinite(x) for pair in losses for x in pair) and all_finite(runner.params)
    return result


# ---------------------------------------------------------------------------------- isolation


def _child(conn, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result = {"ok": True, "value": fn(*args)}
    except BaseException as err:  # noqa: BLE001 (reported to the parent, which decides)
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    conn.send(result)
    conn.close()


_SERVER_CONTEXT: multiprocessing.context.BaseContext | None = None


def isolation_context() -> multiprocessing.context.BaseContext:
    """A fork server that has imported this module (torch, transformers, eupmu_kernels) once, so
    that each measurement starts in a fresh process without paying the imports again."""
    global _SERVER_CONTEXT
    if _SERVER_CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "eupmu_unlearn.memory"])
        _SERVER_CONTEXT = ctx
    return _SERVER_CONTEXT


@dataclass
class Isolated:
    ok: bool
    value: Any = None
    error: str | None = None
    traceback: str | None = None
    exitcode: int | None = None


def run_isolated(fn: Callable[..., Any], *args: Any) -> Isolated:
    """``fn(*args)`` in a fresh process; its picklable result, or why there is none."""
    ctx = isolation_context()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    process.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    process.join()
    if message is None:
        code = process.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if code == -9:
            why += " (the kernel's OOM killer, most likely)"
        return Isolated(False, error=f"the worker process died without a result: {why}", exitcode=code)
    return Isolated(message["ok"], message.get("value"), message.get("error"), message.get("traceback"),
                    process.exitcode)


# ---------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ScaleConfig:
    sizes: tuple[int, ...]
    methods: tuple[str, ...] = tuple(METHODS)
    vocab: int = VOCAB
    batch: int = 2
    seq: int = 64
    warmup: int = 1
    iterations: int = 3
    lr: float = LR
    seed: int = 0
    threads: int | None = None
    memory_budget: int | None = None  # bytes a worker may use; default: MemAvailable at the start
    fit_memory_gib: tuple[float, ...] = (24.0, 80.0)
    tensor_memory: bool = True
    check: bool = True

    def task(self, method: str, numel: int, memory_limit: int | None) -> Task:
        return Task(method, numel, self.vocab, self.batch, self.seq, self.warmup, self.iterations, self.lr,
                    self.seed, self.threads, memory_limit, self.tensor_memory, self.check)


def predicted_peak(method: str, numel: int, start_rss: float, fits: dict[str, dict[str, float]]) -> float:
    """Bytes at the peak: the measured line when there is one, else the bytes model on the start RSS."""
    fit = fits.get(method)
    if fit is not None:
        return fit["intercept_bytes"] + fit["bytes_per_param"] * numel
    return start_rss + METHODS[method].peak_bytes_per_param * numel


def fit_line(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """memory = a + b N through two measured sizes (the two smallest)."""
    points = sorted(points)[:2]
    if len(points) < 2 or points[0][0] == points[1][0]:
        return None
    (n1, m1), (n2, m2) = points
    b = (m2 - m1) / (n2 - n1)
    return {"bytes_per_param": b, "intercept_bytes": m1 - b * n1, "sizes": [n1, n2]}


def largest_fitting(fit: dict[str, float], memory_bytes: float) -> float | None:
    if fit["bytes_per_param"] <= 0:
        return None
    return max(0.0, (memory_bytes - fit["intercept_bytes"]) / fit["bytes_per_param"])


def run_scale(config: ScaleConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every (size, method) in its own process; then the fit, its check and the derived lines."""
    budget = config.memory_budget or available_memory()
    records: list[dict[str, Any]] = []
    fits: dict[str, dict[str, float]] = {}
    baseline = run_isolated(process_memory)  # what a worker holds before it builds anything
    start_rss = float(baseline.value.get("VmRSS", 1 << 30) if baseline.ok else 1 << 30)
    sizes = sorted(config.sizes)
    for numel in sizes:
        for name in config.methods:
            method = METHODS[name]
            need = predicted_peak(name, numel, start_rss, fits)
            base = {"method": name, "requested_numel": numel,
                    "bytes_model_per_param": method.peak_bytes_per_param, "predicted_peak_bytes": need}
            if budget is not None and need > budget:
                records.append({**base, "skipped": f"predicted peak {need / GIB:.1f} GiB > {budget / GIB:.1f} GiB "
                                                   "available: not started"})
                if progress:
                    progress(f"{numel:.2e} {name}: skipped ({records[-1]['skipped']})")
                continue
            if progress:
                progress(f"{numel:.2e} {name}: running (predicted peak {need / GIB:.1f} GiB)")
            outcome = run_isolated(measure, config.task(name, numel, budget))
            if not outcome.ok:
                records.append({**base, "failed": outcome.error, "traceback": outcome.traceback})
                if progress:
                    progress(f"{numel:.2e} {name}: FAILED: {outcome.error}")
                continue
            rec = {**base, **outcome.value}
            rec["bytes_model_peak_bytes"] = rec["start_rss_bytes"] + method.peak_bytes_per_param * rec["numel"]
            start_rss = rec["start_rss_bytes"]
            records.append(rec)
            if progress:
                progress(f"{numel:.2e} {name}: {rec['iteration_s']:.2f} s/iteration, "
                         f"peak {rec['peak_rss_bytes'] / GIB:.2f} GiB")
            measured = [(r["numel"], r["peak_rss_bytes"]) for r in records if r["method"] == name and "numel" in r]
            line = fit_line(measured)
            if line is not None:
                fits[name] = line
        gc.collect()
    return summarise(config, records, fits, budget)


def summarise(config: ScaleConfig, records: list[dict[str, Any]], fits: dict[str, dict[str, float]],
              budget: int | None) -> dict[str, Any]:
    done = [r for r in records if "numel" in r]
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in done:
        by_size.setdefault(r["requested_numel"], {})[r["method"]] = r
    for group in by_size.values():
        floor = group.get(FLOOR)
        for r in group.values():
            if floor is not None:
                grad = PARAM_BYTES * r["numel"]
                r["excess_over_floor_grads"] = (r["peak_rss_bytes"] - floor["peak_rss_bytes"]) / grad
                if r.get("tensor_peak_bytes") is not None and floor.get("tensor_peak_bytes") is not None:
                    r["tensor_excess_over_floor_grads"] = (r["tensor_peak_bytes"] - floor["tensor_peak_bytes"]) / grad
                r["iteration_vs_floor"] = r["iteration_s"] / floor["iteration_s"]
    memories = [m * GIB for m in config.fit_memory_gib]
    machine_total = total_memory()
    lines = []
    for name in config.methods:
        fit = fits.get(name)
        if fit is None:
            continue
        entry = {"method": name, **fit, "largest_numel": {f"{m / GIB:g} GiB": largest_fitting(fit, m)
                                                          for m in memories}}
        if machine_total:
            entry["largest_numel_this_machine"] = largest_fitting(fit, machine_total)
        checks = [r for r in done if r["method"] == name and r["numel"] > max(fit["sizes"])]
        if checks:
            r = max(checks, key=lambda r: r["numel"])
            pred = fit["intercept_bytes"] + fit["bytes_per_param"] * r["numel"]
            entry["check"] = {"numel": r["numel"], "predicted_bytes": pred, "measured_bytes": r["peak_rss_bytes"],
                              "error": (r["peak_rss_bytes"] - pred) / r["peak_rss_bytes"]}
        else:
            skipped = [r for r in records if r["method"] == name and "numel" not in r
                       and r["requested_numel"] > max(fit["sizes"])]
            if skipped:
                entry["check"] = {"numel": skipped[-1]["requested_numel"],
                                  "not_run": skipped[-1].get("skipped") or skipped[-1].get("failed")}
        lines.append(entry)
    return {"config": asdict(config), "records": records, "fits": lines, "memory_budget_bytes": budget,
            "machine_memory_bytes": machine_total,
            "methods": {name: METHODS[name].description for name in config.methods},
            "bytes_model": {name: dict(METHODS[name].peak_terms) for name in config.methods},
            "memory_probe": "peak resident set size (VmHWM of /proc/self/status) of the process that ran the "
                            "method, forked from a server that had imported torch, transformers and eupmu_kernels; "
                            "read after the timed iterations"}


# ---------------------------------------------------------------------------------- correctness


def failures(result: dict[str, Any]) -> list[str]:
    """What is wrong with a run's results (empty when every method ran and checked out)."""
    problems = []
    for r in result["records"]:
        where = f"{r['method']} at {r['requested_numel']:.2e}"
        if "failed" in r:
            problems.append(f"{where}: {r['failed']}")
        elif "skipped" in r:
            continue
        else:
            if not r["finite"]:
                problems.append(f"{where}: a loss or parameter is not finite")
            check = r.get("check")
            if check is not None and not check["passed"]:
                problems.append(f"{where}: the update differs from the float64 reference: {check}")
    return problems

