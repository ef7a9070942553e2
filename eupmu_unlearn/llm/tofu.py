"""TOFU-style metrics for question answering unlearning (Maini et al., 2024), from model scores.

Everything here works on numbers a model produced, so it is testable on hand-made values:

- answer probability: P(a|q)^(1/|a|), the per-token geometric mean of the answer's likelihood;
  on the world-facts split it is normalised against the perturbed answers,
  P(a|q)^(1/|a|) / (P(a|q)^(1/|a|) + sum_k P(a_k|q)^(1/|a_k|));
- ROUGE-L recall of the greedy answer against the reference answer, computed by the
  ``rouge-score`` package with Porter stemming (``RougeScorer(["rougeL"], use_stemmer=True)``),
  the scorer TOFU and OpenUnlearning report, so "wrote"/"writes" and "novels"/"novel" match as
  they do there;
- truth ratio R = mean_k P(perturbed_k|q)^(1/|perturbed_k|) / P(paraphrase|q)^(1/|paraphrase|)
  (R < 1: the model prefers the true paraphrase over wrong answers). Its summary statistic is
  mean(min(R, 1/R)) on the forget split and mean(max(0, 1 - R)) on the others;
- forget quality: the p-value of a two-sample Kolmogorov-Smirnov test between the forget-split
  truth ratios of the unlearned model and of the oracle (a model never trained on the forget
  set); high means indistinguishable from the oracle;
- model utility: the harmonic mean of the retain and world-facts statistics (probability,
  ROUGE-L, truth statistic), so one collapsed statistic pulls it down.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

SPLITS = ("forget", "retain", "world")
_WORD = re.compile(r"\w+")


@dataclass
class SplitScores:
    """What a model produced on one split of N questions with K perturbed answers each.

    Log-probabilities are sums over the answer tokens (natural log); ``*_tokens`` count them.
    """

    answer_logprob: np.ndarray  # (N,)
    answer_tokens: np.ndarray  # (N,)
    paraphrase_logprob: np.ndarray  # (N,)
    paraphrase_tokens: np.ndarray  # (N,)
    perturbed_logprob: np.ndarray  # (N, K)
    perturbed_tokens: np.ndarray  # (N, K)
    references: list[str]
    generations: list[str]
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("answer_logprob", "answer_tokens", "paraphrase_logprob", "paraphrase_tokens",
                     "perturbed_logprob", "perturbed_tokens"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        n = self.answer_logprob.shape[0]
        if self.perturbed_logprob.ndim != 2 or self.perturbed_logprob.shape[0] != n:
            raise ValueError(f"perturbed_logprob must have shape (N={n}, K), got {self.perturbed_logprob.shape}")
        if self.perturbed_tokens.shape != self.perturbed_logprob.shape:
            raise ValueError("perturbed_tokens must have the shape of perturbed_logprob")
        if len(self.references) != n or len(self.generations) != n:
            raise ValueError("one reference and one generation per question")
        if np.any(self.answer_tokens <= 0) or np.any(self.paraphrase_tokens <= 0) or np.any(self.perturbed_tokens <= 0):
            raise ValueError("every answer needs at least one token")


@dataclass
class SplitMetrics:
    probability: float
    rouge_l: float
    truth_statistic: float
    key_hit_rate: float
    truth_ratios: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelMetrics:
    forget: SplitMetrics
    retain: SplitMetrics
    world: SplitMetrics
    model_utility: float
    forget_quality: float | None  # None without oracle truth ratios

    def as_dict(self) -> dict:
        return {"forget": self.forget.as_dict(), "retain": self.retain.as_dict(), "world": self.world.as_dict(),
                "model_utility": self.model_utility, "forget_quality": self.forget_quality}


def normalised_probability(logprob: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """P^(1/|a|) = exp(log P / |a|), elementwise."""
    return np.exp(np.asarray(logprob, dtype=np.float64) / np.asarray(tokens, dtype=np.float64))


def option_normalised_probability(scores: SplitScores) -> np.ndarray:
    """The true answer's share of probability among itself and its perturbed answers, per question."""
    true = normalised_probability(scores.answer_logprob, scores.answer_tokens)
    wrong = normalised_probability(scores.perturbed_logprob, scores.perturbed_tokens).sum(axis=1)
    return true / (true + wrong)


def truth_ratio(scores: SplitScores) -> np.ndarray:
    """R per question: mean perturbed normalised probability over the paraphrase's (computed in log space)."""
    perturbed = scores.perturbed_logprob / scores.perturbed_tokens
    paraphrase = scores.paraphrase_logprob / scores.paraphrase_tokens
    k = perturbed.shape[1]
    top = perturbed.max(axis=1)
    log_mean_perturbed = top + np.log(np.exp(perturbed - top[:, None]).sum(axis=1) / k)
    return np.exp(log_mean_perturbed - paraphrase)


def truth_statistic(ratios: np.ndarray, split: str) -> float:
    """mean(min(R, 1/R)) on the forget split, mean(max(0, 1 - R)) elsewhere."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if split == "forget":
        return float(np.mean(np.minimum(ratios, 1.0 / ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - ratios)))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - the dev stack pins it
        raise ImportError("the LLM metrics need the rouge-score package: pip install rouge-score==0.1.2") from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, candidate: str) -> float:
    """ROUGE-L recall of ``candidate`` against ``reference`` (rouge-score, Porter-stemmed tokens):
    LCS of the stemmed lower-cased tokens over the reference's token count; 0 for an empty reference."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].recall)


def key_hit(key: str, generation: str) -> bool:
    """Whether the generated answer states the fact (all of the key's words, in order)."""
    key_words = words(key)
    return bool(key_words) and lcs_length(key_words, words(generation)) == len(key_words)


def forget_quality(unlearned_ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between forget-split truth ratios (1.0: indistinguishable)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(unlearned_ratios, dtype=np.float64),
                          np.asarray(oracle_ratios, dtype=np.float64)).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0.0 as soon as one of them is 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("harmonic mean of nothing")
    if np.any(values < 0):
        raise ValueError("harmonic mean needs non-negative values")
    if np.any(values == 0):
        return 0.0
    return float(values.size / np.sum(1.0 / values))


def split_metrics(scores: SplitScores, split: str) -> SplitMetrics:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "world":
        probability = option_normalised_probability(scores)
    else:
        probability = normalised_probability(scores.answer_logprob, scores.answer_tokens)
    ratios = truth_ratio(scores)
    rouge = [rouge_l_recall(r, g) for r, g in zip(scores.references, scores.generations)]
    hits = [key_hit(k, g) for k, g in zip(scores.keys, scores.generations)] if scores.keys else []
    return SplitMetrics(probability=float(np.mean(probability)), rouge_l=float(np.mean(rouge)),
                        truth_statistic=truth_statistic(ratios, split),
                        key_hit_rate=float(np.mean(hits)) if hits else float("nan"),
                        truth_ratios=[float(r) for r in ratios])


def model_utility(retain: SplitMetrics, world: SplitMetrics) -> float:
    return harmonic_mean([retain.probability, retain.rouge_l, retain.truth_statistic,
                          world.probability, world.rouge_l, world.truth_statistic])


def summarise(forget: SplitScores, retain: SplitScores, world: SplitScores,
              oracle_forget_ratios: Sequence[float] | None = None) -> ModelMetrics:
    """All metrics of one model; forget quality needs the oracle's forget-split truth ratios."""
    f, r, w = split_metrics(forget, "forget"), split_metrics(retain, "retain"), split_metrics(world, "world")
    quality = None if oracle_forget_ratios is None else forget_quality(f.truth_ratios, oracle_forget_ratios)
    return ModelMetrics(forget=f, retain=r, world=w, model_utility=model_utility(r, w), forget_quality=quality)
