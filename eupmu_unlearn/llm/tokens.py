"""Token sequences for causal language models: encoding, padding, and how a model scores them.

Shared by the LLM pipeline and the Hugging Face integration (:mod:`eupmu_unlearn.hf`). A batch is
a mapping with ``input_ids``, ``attention_mask`` and ``labels`` (long tensors of one shape);
labels are -100 where nothing is scored (the prompt, padding), and position t is scored on
predicting token t from the tokens before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import NPO_BETA, SIMNPO_BETA, SIMNPO_GAMMA, forget_loss

IGNORE_INDEX = -100
BATCH_FIELDS = ("input_ids", "attention_mask", "labels")
TEXT_FORGET_LOSSES = ("ga", "npo", "simnpo")  # random labels need classes
Batch = Mapping[str, Tensor]


def encode_example(codec: Any, question: str, answer: str, with_end: bool = True) -> dict[str, list[int]]:
    """Input ids and labels of one question and answer: the prompt is not scored, the end marker is."""
    prompt = codec.prompt_ids(question)
    target = codec.answer_ids(answer) + ([codec.end_id] if with_end else [])
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def pad_examples(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0,
                 pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Right-pads examples (``input_ids`` and optionally ``attention_mask`` and ``labels``, lists
    or 1-D tensors) into one batch. Missing labels are the input ids; padded and masked
    positions get label -100."""
    if not examples:
        raise ValueError("cannot pad an empty list of examples")
    rows = [_example_tensors(e) for e in examples]
    length = max(ids.numel() for ids, _, _ in rows)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask, lab) in enumerate(rows):
        n = ids.numel()
        input_ids[i, :n] = ids
        attention_mask[i, :n] = mask
        labels[i, :n] = torch.where(mask.bool(), lab, torch.full_like(lab, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _example_tensors(example: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
    mask = example.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
    labels = example.get("labels")
    labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if not ids.numel() == mask.numel() == labels.numel():
        raise ValueError(f"input_ids, attention_mask and labels differ in length: "
                         f"{ids.numel()}, {mask.numel()}, {labels.numel()}")
    return ids, mask, labels


def to_device(batch: Batch, device: torch.device | str) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _scalar(loss: Tensor) -> Tensor:
    """nn.DataParallel returns one loss per device."""
    return loss.mean() if loss.dim() > 0 else loss


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens: the model's own loss."""
    outputs = model(**batch)
    return _scalar(outputs["loss"] if isinstance(outputs, Mapping) else outputs[0])


def sequence_log_prob(model: nn.Module, batch: Batch) -> Tensor:
    """Per sequence, the sum of the log-probabilities of its labelled next tokens (float32)."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    shifted_logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    token_nll = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return -token_nll.view(targets.shape).sum(dim=1)


def scored_tokens(batch: Batch) -> Tensor:
    """Per sequence, the number of tokens that :func:`sequence_log_prob` scores."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


@dataclass
class TextSide:
    """One side of a batch of token sequences as a :class:`eupmu_unlearn.losses.Side`."""

    model: nn.Module
    batch: Batch
    reference_log_prob: Tensor | None = None

    def cross_entropy(self) -> Tensor:
        return causal_lm_loss(self.model, self.batch)

    def random_label_cross_entropy(self) -> Tensor:
        raise ValueError("the random-label forget loss needs class labels; text has none (use ga or npo)")

    def log_prob(self) -> Tensor:
        return sequence_log_prob(self.model, self.batch)

    def target_count(self) -> Tensor:
        return scored_tokens(self.batch).clamp(min=1)


def text_forget_loss(name: str, model: nn.Module, batch: Batch, reference_log_prob: Tensor | None = None,
                     npo_beta: float = NPO_BETA, simnpo_beta: float = SIMNPO_BETA,
                     simnpo_gamma: float = SIMNPO_GAMMA) -> Tensor:
    """The forget loss ``name`` (:mod:`eupmu_unlearn.losses`) of a batch of token sequences."""
    return forget_loss(name, TextSide(model, batch, reference_log_prob), npo_beta, simnpo_beta, simnpo_gamma)

