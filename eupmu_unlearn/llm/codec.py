"""Turning questions and answers into token ids, and ids back into text.

A codec fixes the prompt format: ``prompt_ids(question) + answer_ids(answer) + end_ids`` is one
training sequence whose loss covers only the answer and the end marker. :class:`ChatCodec` wraps
a Hugging Face tokenizer with SmolLM2's chat markup; :class:`WordCodec` is a word-level toy
codec for tiny randomly initialised models in tests.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Protocol, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


class Codec(Protocol):
    pad_id: int
    end_id: int
    vocab_size: int

    def prompt_ids(self, question: str) -> list[int]: ...

    def answer_ids(self, answer: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ChatCodec:
    """A Hugging Face tokenizer with ChatML markup (the format SmolLM2-Instruct was tuned on).

    No system message is added: it would double the length of these short sequences.
    """

    def __init__(self, tokenizer: Any, user_prefix: str = "<|im_start|>user\n",
                 assistant_prefix: str = "<|im_end|>\n<|im_start|>assistant\n", end_token: str = "<|im_end|>") -> None:
        self.tokenizer = tokenizer
        self.user_prefix = user_prefix
        self.assistant_prefix = assistant_prefix
        end = tokenizer.convert_tokens_to_ids(end_token)
        if end is None or end == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {end_token!r} token")
        self.end_id = int(end)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_id
        self.vocab_size = len(tokenizer)

    def prompt_ids(self, question: str) -> list[int]:
        return self._encode(f"{self.user_prefix}{question}{self.assistant_prefix}")

    def answer_ids(self, answer: str) -> list[int]:
        return self._encode(answer)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class WordCodec:
    """Word-level vocabulary built from the given texts (ids: 0 pad, 1 end, 2 question, 3 answer, 4 unknown)."""

    SPECIALS = ("<pad>", "<end>", "<q>", "<a>", "<unk>")

    def __init__(self, texts: Iterable[str]) -> None:
        words = sorted({w for text in texts for w in _WORD.findall(text)})
        self.vocab = list(self.SPECIALS) + words
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.end_id, self.question_id, self.answer_id, self.unknown_id = range(len(self.SPECIALS))
        self.vocab_size = len(self.vocab)

    def prompt_ids(self, question: str) -> list[int]:
        return [self.question_id, *self._encode(question), self.answer_id]

    def answer_ids(self, answer: str) -> list[int]:
        return self._encode(answer)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(self.SPECIALS))

    def _encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unknown_id) for w in _WORD.findall(text)]
