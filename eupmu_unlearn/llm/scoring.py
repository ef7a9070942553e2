"""Running a model over a split: answer log-probabilities and greedy answers, for the TOFU metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

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
    """Greedy answers from ``model.generate(do_sample=False)``, prompts left-padded, cut at the end marker.

    The decoding TOFU and OpenUnlearning score: the answer is the argmax continuation of the
    prompt, up to the end marker or ``max_new_tokens`` tokens.
    """
    device = next(model.parameters()).device
    model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [codec.prompt_ids(q) for q in questions[start:start + batch_size]]
        for row in _generate_batch(model, prompts, codec.pad_id, codec.end_id, max_new_tokens, device):
            cut = row.index(codec.end_id) if codec.end_id in row else len(row)
            answers.append(codec.decode(row[:cut]))
    return answers


def _generate_batch(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, end_id: int,
                    max_new_tokens: int, device: torch.device) -> list[list[int]]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    # Sampling settings of the model's own generation config (temperature, top_p) do not apply
    # to greedy decoding: they are cleared so that none of them is in force or warned about.
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None)
    return out[:, length:].tolist()


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
