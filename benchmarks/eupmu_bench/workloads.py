"""Parameter sets shaped like real models, scaled to a requested total size.

A model family lists the tensor shapes of a transformer as a function of its hidden width and
vocabulary size. To reach N parameters the hidden width is scaled by sqrt(N / N_reference)
(weights grow with the square of the width), rounded like real configurations, and the
vocabulary (embedding rows) absorbs the remainder, so the total lands within one embedding row
of N while the number, kinds and proportions of tensors stay those of the real model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Shape = tuple[int, ...]

MIN_HIDDEN = 8


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    reference_hidden: int
    reference_vocab: int
    embedding_matrices: int  # how many (vocab, hidden) matrices the model has
    body: Callable[[int], list[Shape]]  # every shape except the (vocab, hidden) embeddings

    def shapes(self, hidden: int, vocab: int) -> list[Shape]:
        embeddings: list[Shape] = [(vocab, hidden)] * self.embedding_matrices
        return embeddings[:1] + self.body(hidden) + embeddings[1:]

    def reference_numel(self) -> int:
        return count(self.shapes(self.reference_hidden, self.reference_vocab))


def count(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def _gpt2_body(hidden: int, layers: int = 12, positions: int = 1024) -> list[Shape]:
    d = hidden
    block: list[Shape] = [
        (d,), (d,),  # ln_1
        (3 * d, d), (3 * d,),  # fused qkv projection
        (d, d), (d,),  # attention output projection
        (d,), (d,),  # ln_2
        (4 * d, d), (4 * d,),  # mlp up
        (d, 4 * d), (d,),  # mlp down
    ]
    return [(positions, d)] + block * layers + [(d,), (d,)]


def _llama_ffn(hidden: int) -> int:
    multiple = 256 if hidden >= 1024 else 8
    return _round_up(int(8 * hidden / 3), multiple)


def _llama_body(hidden: int, layers: int = 32) -> list[Shape]:
    d, f = hidden, _llama_ffn(hidden)
    block: list[Shape] = [
        (d,),  # attention RMSNorm
        (d, d), (d, d), (d, d), (d, d),  # q, k, v, o
        (d,),  # mlp RMSNorm
        (f, d), (f, d), (d, f),  # gate, up, down
    ]
    return block * layers + [(d,)]


GPT2 = ModelFamily("gpt2", "GPT-2 small layout: 12 blocks, fused qkv, 4x MLP, biases, tied embedding",
                   768, 50257, 1, _gpt2_body)
LLAMA = ModelFamily("llama", "Llama-2-7B layout: 32 blocks, separate q/k/v/o, SwiGLU MLP, RMSNorm, "
                    "untied embedding and head", 4096, 32000, 2, _llama_body)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (GPT2, LLAMA)}


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _round_hidden(hidden: float) -> int:
    # Rounded down, so the vocabulary keeps roughly its reference share of the parameters.
    multiple = 64 if hidden >= 512 else MIN_HIDDEN
    return max(MIN_HIDDEN, int(hidden // multiple) * multiple)


def _step_down(hidden: int) -> int:
    return hidden - (64 if hidden > 512 else MIN_HIDDEN)


def scaled_shapes(family: ModelFamily, numel: int) -> list[Shape]:
    """Tensor shapes of ``family`` with (within one embedding row) ``numel`` parameters."""
    hidden = _round_hidden(family.reference_hidden * math.sqrt(numel / family.reference_numel()))
    while True:
        rest = count(family.body(hidden))
        vocab = (numel - rest) // (family.embedding_matrices * hidden)
        if vocab >= 16 or hidden <= MIN_HIDDEN:
            break
        hidden = max(MIN_HIDDEN, _step_down(hidden))
    if vocab < 1:
        smallest = count(family.body(MIN_HIDDEN)) + family.embedding_matrices * MIN_HIDDEN
        raise ValueError(f"{numel} parameters is too small for the {family.name} layout (minimum {smallest})")
    return family.shapes(hidden, vocab)


@dataclass
class Workload:
    """Parameters and the two gradients of one benchmark point.

    ``grads_r`` conflicts with ``grads_f`` (negative dot product), so every surgery method
    takes its correcting branch: the measured work is the full surgery, never a shortcut.
    """

    model: str
    numel: int
    dtype: torch.dtype
    device: torch.device
    shapes: list[Shape]
    params: list[Tensor]
    grads_f: list[Tensor]
    grads_r: list[Tensor]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one full set of parameters (or of one gradient)."""
        return self.numel * self.dtype.itemsize

    def fresh_params(self) -> list[Tensor]:
        """Independent copies of the parameters (each method steps its own)."""
        return [p.detach().clone().requires_grad_(True) for p in self.params]


def make_workload(model: str, numel: int, dtype: torch.dtype, device: torch.device | str,
                  seed: int = 0) -> Workload:
    family = FAMILIES[model]
    device = torch.device(device)
    shapes = scaled_shapes(family, numel)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def normal(shape: Shape, scale: float) -> Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    params = [normal(s, 0.02) for s in shapes]
    grads_f = [normal(s, 1.0) for s in shapes]
    grads_r = [normal(s, 1.0).add_(g, alpha=-0.5) for s, g in zip(shapes, grads_f)]
    return Workload(model, count(shapes), dtype, device, shapes, params, grads_f, grads_r)
