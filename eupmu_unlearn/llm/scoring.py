"""Running a model over a split: answer log-probabilities and greedy answers, for the TOFU metrics."""

from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .tofu import SplitScores
from .codec import Codec
from .data import QAItem
from .tokens import encode_example, pad_examples, scored_tokens, sequence_log_prob, to_device


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, codec: Codec, pairs: Sequence[tuple[str, str]],
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log P(answer tokens | question) and the answer token count, per (question, answer)."""
    device = next(model.parameters()).device
    examples = [encode_example(codec, q, a, with_end=False) for q, a in pairs]
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    logprob = torch.zeros(len(examples), dtype=torch.float64)
    tokens = torch.zeros(len(examples), dtype=torch.float64)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = to_device(pad_examples([examples[i] for i in rows], codec.pad_id), device)
        logprob[rows] = sequence_log_prob(model, batch).double().cpu()
        tokens[rows] = scored_tokens(batch).double().cpu()
    return logprob.numpy(), tokens.numpy()


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, codec: Codec, questions: Sequence[str], max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """Greedy decoding with a key-value cache, prompts left-padded, stopping at the end marker."""
    device = next(model.parameters()).device
    model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [codec.prompt_ids(q) for q in questions[start:start + batch_size]]
        tokens = _greedy_batch(model, prompts, codec.pad_id, codec.end_id, max_new_tokens, device)
        for row in tokens:
            cut = row.index(codec.end_id) if codec.end_id in row else len(row)
            answers.append(codec.decode(row[:cut]))
    return answers


def _greedy_batch(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, end_id: int,
                  max_new_tokens: int, device: torch.device) -> list[list[int]]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache_arg, extra = _forward_arguments(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    generated: list[Tensor] = []
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    token = out.logits[:, -1].argmax(dim=-1)
    for _ in range(max_new_tokens):
        generated.append(token)
        finished |= token == end_id
        if bool(finished.all()):  # evaluation only: one host check per generated token is fine
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_arg: cache}, **extra)
        token = out.logits[:, -1].argmax(dim=-1)
    return torch.stack(generated, dim=1).tolist()


def _forward_arguments(model: torch.nn.Module) -> tuple[str, dict]:
    """The key-value cache argument's name (``cache`` in recent transformers, ``past_key_values``
    before) and, where supported, ``logits_to_keep=1`` so the prompt's logits are not computed."""
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


def score_split(model: torch.nn.Module, codec: Codec, items: Sequence[QAItem], max_new_tokens: int = 32,
                batch_size: int = 16) -> SplitScores:
    """Everything the TOFU metrics need about one split, in one pass over its texts."""
    if not items:
        raise ValueError("cannot score an empty split")
    k = len(items[0].perturbed)
    if any(len(it.perturbed) != k for it in items):
        raise ValueError("every item of a split needs the same number of perturbed answers")
    pairs = [(it.question, it.answer) for it in items] + [(it.question, it.paraphrase) for it in items]
    pairs += [(it.question, p) for it in items for p in it.perturbed]
    logprob, tokens = answer_logprobs(model, codec, pairs, batch_size)
    n = len(items)
    generations = greedy_answers(model, codec, [it.question for it in items], max_new_tokens, batch_size)
    return SplitScores(answer_logprob=logprob[:n], answer_tokens=tokens[:n],
                       paraphrase_logprob=logprob[n:2 * n], paraphrase_tokens=tokens[n:2 * n],
                       perturbed_logprob=logprob[2 * n:].reshape(n, k), perturbed_tokens=tokens[2 * n:].reshape(n, k),
                       references=[it.answer for it in items], generations=generations,
                       keys=[it.key for it in items])
