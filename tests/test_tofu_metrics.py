"""TOFU-style metrics on hand-made log-probabilities and texts (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eupmu_unlearn.llm import tofu

LOG = math.log


def scores(answer_p, para_p, pert_p, tokens=2, references=None, generations=None, keys=None) -> tofu.SplitScores:
    """Scores whose per-token (normalised) probabilities are the given values, each answer ``tokens`` long."""
    answer_p, para_p, pert_p = np.asarray(answer_p, float), np.asarray(para_p, float), np.asarray(pert_p, float)
    n = len(answer_p)
    references = references or ["the answer"] * n
    return tofu.SplitScores(
        answer_logprob=tokens * np.log(answer_p), answer_tokens=np.full(n, tokens),
        paraphrase_logprob=tokens * np.log(para_p), paraphrase_tokens=np.full(n, tokens),
        perturbed_logprob=tokens * np.log(pert_p), perturbed_tokens=np.full(pert_p.shape, tokens),
        references=references, generations=generations or list(references), keys=keys or [])


def test_normalised_probability_is_per_token_geometric_mean():
    # P(a) = 0.5 * 0.125 over two tokens: geometric mean 0.25
    assert tofu.normalised_probability(np.array([LOG(0.5) + LOG(0.125)]), np.array([2]))[0] == pytest.approx(0.25)


def test_truth_ratio_is_mean_perturbed_over_paraphrase():
    s = scores([0.9], [0.5], [[0.1, 0.3]])
    assert tofu.truth_ratio(s)[0] == pytest.approx(0.2 / 0.5)


def test_truth_ratio_uses_each_answers_own_length():
    s = tofu.SplitScores(answer_logprob=[LOG(0.5)], answer_tokens=[1], paraphrase_logprob=[3 * LOG(0.5)],
                         paraphrase_tokens=[3], perturbed_logprob=[[LOG(0.25), 4 * LOG(0.75)]],
                         perturbed_tokens=[[1, 4]], references=["a"], generations=["a"])
    assert tofu.truth_ratio(s)[0] == pytest.approx(((0.25 + 0.75) / 2) / 0.5)


def test_truth_ratio_is_stable_for_tiny_probabilities():
    # per-token log-probabilities of -800 underflow exp() in float64 unless computed in log space
    s = tofu.SplitScores(answer_logprob=[-1600.0], answer_tokens=[2], paraphrase_logprob=[-1602.0],
                         paraphrase_tokens=[2], perturbed_logprob=[[-1600.0, -1600.0]],
                         perturbed_tokens=[[2, 2]], references=["a"], generations=["a"])
    assert tofu.truth_ratio(s)[0] == pytest.approx(math.e)


def test_truth_statistic_per_split():
    ratios = np.array([0.5, 2.0, 1.0])
    assert tofu.truth_statistic(ratios, "forget") == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert tofu.truth_statistic(ratios, "retain") == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_option_normalised_probability():
    s = scores([0.6], [0.5], [[0.2, 0.2]])
    assert tofu.option_normalised_probability(s)[0] == pytest.approx(0.6)


@pytest.mark.parametrize("a, b, expected", [
    ("ABCBDAB", "BDCABA", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "xyz", 0), ("a", "aaaa", 1)])
def test_lcs_length(a, b, expected):
    assert tofu.lcs_length(list(a), list(b)) == expected
    assert tofu.lcs_length(list(b), list(a)) == expected


def test_rouge_l_recall_on_words_ignores_case_and_punctuation():
    assert tofu.rouge_l_recall("The cat sat on the mat.", "the CAT is on a mat") == pytest.approx(4 / 6)
    assert tofu.rouge_l_recall("The cat sat.", "") == 0.0
    assert tofu.rouge_l_recall("", "anything") == 0.0
    # recall, not precision: extra words in the candidate cost nothing
    assert tofu.rouge_l_recall("Paris", "The capital of France is Paris, a big city.") == 1.0


@pytest.mark.parametrize("reference, candidate, stemmed, unstemmed", [
    # matches only once plurals and verb forms are stemmed (Porter: parents -> parent, nurses -> nurs)
    ("Her parents were bakers and nurses.", "Her parent was a baker and a nurse.", 5 / 6, 2 / 6),
    ("Dalia writes stories about dragons.", "Dalia wrote a story about a dragon.", 4 / 5, 2 / 5),
    ("He won the Silver Quill Prize.", "He wins Silver Quill Prizes.", 4 / 6, 3 / 6),
])
def test_rouge_l_recall_stems_inflected_answers(reference, candidate, stemmed, unstemmed):
    """The TOFU scorer (rouge-score, use_stemmer=True); a word-exact LCS scores these lower."""
    assert tofu.rouge_l_recall(reference, candidate) == pytest.approx(stemmed, abs=1e-12)
    plain = tofu.lcs_length(tofu.words(reference), tofu.words(candidate)) / len(tofu.words(reference))
    assert plain == pytest.approx(unstemmed) and plain < stemmed


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=12),
       st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=12))
def test_rouge_l_recall_bounds(ref, cand):
    reference, candidate = " ".join(ref), " ".join(cand)
    value = tofu.rouge_l_recall(reference, candidate)
    assert 0.0 <= value <= 1.0
    if ref:
        assert tofu.rouge_l_recall(reference, reference) == 1.0
        assert value == pytest.approx(tofu.lcs_length(ref, cand) / len(ref))


def test_key_hit():
    assert tofu.key_hit("Leonardo da Vinci", "It was painted by Leonardo da Vinci.")
    assert not tofu.key_hit("Leonardo da Vinci", "It was painted by Leonardo.")
    assert not tofu.key_hit("", "anything")


def test_forget_quality_is_the_ks_p_value():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    oracle = rng.normal(1.0, 0.1, 40)
    assert tofu.forget_quality(oracle, oracle) == pytest.approx(1.0)
    far = oracle + 5.0
    assert tofu.forget_quality(far, oracle) < 1e-6
    other = rng.normal(1.1, 0.1, 40)
    assert tofu.forget_quality(other, oracle) == pytest.approx(ks_2samp(other, oracle).pvalue)


def test_harmonic_mean():
    assert tofu.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert tofu.harmonic_mean([0.3, 0.3, 0.3]) == pytest.approx(0.3)
    assert tofu.harmonic_mean([1.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        tofu.harmonic_mean([])
    with pytest.raises(ValueError):
        tofu.harmonic_mean([1.0, -0.1])


def test_split_metrics_and_model_utility():
    retain = scores([0.8, 0.6], [0.5, 0.5], [[0.25, 0.25], [0.5, 0.5]],
                    references=["Ann was born in Oslo.", "Bob writes poetry."],
                    generations=["Ann was born in Oslo.", "Bob writes crime."], keys=["Oslo", "poetry"])
    r = tofu.split_metrics(retain, "retain")
    assert r.probability == pytest.approx(0.7)
    assert r.rouge_l == pytest.approx((1.0 + 2 / 3) / 2)
    assert r.truth_ratios == pytest.approx([0.5, 1.0])
    assert r.truth_statistic == pytest.approx(0.25)
    assert r.key_hit_rate == pytest.approx(0.5)

    world = scores([0.6], [0.4], [[0.1, 0.1]], references=["Paris."], generations=["Paris."])
    w = tofu.split_metrics(world, "world")
    assert w.probability == pytest.approx(0.6 / 0.8)  # normalised against the perturbed answers
    assert w.truth_statistic == pytest.approx(0.75)
    assert math.isnan(w.key_hit_rate)  # no keys given

    forget = scores([0.9], [0.5], [[0.25, 0.25]])
    metrics = tofu.summarise(forget, retain, world)
    assert metrics.forget_quality is None
    expected = tofu.harmonic_mean([r.probability, r.rouge_l, r.truth_statistic, w.probability, w.rouge_l,
                                   w.truth_statistic])
    assert metrics.model_utility == pytest.approx(expected)
    with_oracle = tofu.summarise(forget, retain, world, oracle_forget_ratios=[0.5])
    assert with_oracle.forget_quality == pytest.approx(1.0)
    assert with_oracle.as_dict()["forget"]["truth_ratios"] == pytest.approx([0.5])


def test_split_scores_validation():
    with pytest.raises(ValueError, match="shape"):
        tofu.SplitScores(answer_logprob=[0.0, 0.0], answer_tokens=[1, 1], paraphrase_logprob=[0.0, 0.0],
                         paraphrase_tokens=[1, 1], perturbed_logprob=[0.0, 0.0], perturbed_tokens=[1, 1],
                         references=["a", "b"], generations=["a", "b"])
    with pytest.raises(ValueError, match="token"):
        scores([0.5], [0.5], [[0.5]], tokens=0)
    with pytest.raises(ValueError, match="split"):
        tofu.split_metrics(scores([0.5], [0.5], [[0.5]]), "test")
