"""Unit tests of the evaluation package: metrics on hand-made cases, data, models, methods."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from eupmu_unlearn import losses, memory, methods
from eupmu_unlearn.evaluation import metrics, report, selection, unlearning
from eupmu_unlearn.evaluation.data import Scenario, Split, load_dataset, make_scenario
from eupmu_unlearn.evaluation.models import MLP, SmallCNN, TrainRecipe, cache_key, load_or_train, train_classifier

NUM_CLASSES = 4


class Oracle(nn.Module):
    """Reads the label from the first input feature and predicts it with full confidence."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * nn.functional.one_hot(x[:, 0].long(), NUM_CLASSES).float() + 0.0 * self.dummy


class Constant(nn.Module):
    """Predicts class ``label`` for every input."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], NUM_CLASSES) + 0.0 * self.dummy
        logits[:, self.label] = 5.0
        return logits


def labelled_split(labels: list[int]) -> Split:
    y = torch.tensor(labels)
    x = torch.stack([y.float(), torch.randn(len(labels))], dim=1)
    return Split(x, y)


@pytest.fixture
def class_scenario() -> tuple[Scenario, Split]:
    torch.manual_seed(0)
    train = labelled_split([0, 1, 2, 3] * 10)
    test = labelled_split([0, 1, 2, 3] * 5)
    mask = train.y == 1
    return Scenario("class", 1, train.where(mask), train.where(~mask)), test


def test_accuracy_of_a_perfect_and_a_constant_model():
    split = labelled_split([0, 1, 2, 3, 3, 3])
    assert metrics.accuracy(Oracle(), split) == pytest.approx(100.0)
    assert metrics.accuracy(Constant(3), split) == pytest.approx(50.0)
    assert metrics.accuracy(Constant(0), split) == pytest.approx(100.0 / 6)
    assert math.isnan(metrics.accuracy(Oracle(), split.where(split.y > 9)))


def test_evaluate_perfect_model_class_wise(class_scenario):
    scenario, test = class_scenario
    members = metrics.member_subset(scenario.retain, len(test), seed=0)
    m = metrics.evaluate(Oracle(), scenario, test, members)
    assert (m.UA, m.RA, m.TA, m.TA_all, m.forget_class_test_acc) == pytest.approx((0.0, 100.0, 100.0, 100.0, 100.0))
    # every sample is predicted with confidence 1: forget samples look like members
    assert m.MIA == pytest.approx(0.0)


def test_evaluate_constant_model_class_wise(class_scenario):
    scenario, test = class_scenario
    members = metrics.member_subset(scenario.retain, len(test), seed=0)
    m = metrics.evaluate(Constant(0), scenario, test, members)
    assert m.UA == pytest.approx(100.0)  # the forgotten class 1 is never predicted
    assert m.RA == pytest.approx(100.0 / 3)  # retain has classes 0, 2, 3 in equal numbers
    assert m.TA == pytest.approx(100.0 / 3)  # test accuracy on the kept classes
    assert m.TA_all == pytest.approx(25.0)
    assert m.forget_class_test_acc == pytest.approx(0.0)
    assert 0.0 <= m.MIA <= 100.0


def test_random_scenario_keeps_all_classes_in_ta():
    torch.manual_seed(0)
    split = labelled_split([0, 1, 2, 3] * 5)
    scenario = Scenario("random", None, split.subset(torch.arange(4)), split.subset(torch.arange(4, 20)))
    m = metrics.evaluate(Constant(2), scenario, split, scenario.retain)
    assert m.TA == m.TA_all == pytest.approx(25.0)
    assert m.forget_class_test_acc is None


def test_mia_on_separable_confidences():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.9, 1.0, 200)
    nonmembers = rng.uniform(0.0, 0.1, 200)
    assert metrics.mia_efficacy(members, nonmembers, rng.uniform(0.0, 0.08, 50)) == pytest.approx(100.0)
    assert metrics.mia_efficacy(members, nonmembers, rng.uniform(0.92, 1.0, 50)) == pytest.approx(0.0)
    half = np.concatenate([rng.uniform(0.0, 0.05, 25), rng.uniform(0.95, 1.0, 25)])
    assert metrics.mia_efficacy(members, nonmembers, half) == pytest.approx(50.0)
    assert math.isnan(metrics.mia_efficacy(members, nonmembers, np.zeros(0)))


def test_confidence_of_a_diverged_model_is_finite():
    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], NUM_CLASSES), float("nan"))

    conf = metrics.true_label_confidence(NaNModel(), labelled_split([0, 1]))
    assert np.all(conf == 0.0)


def test_average_gap_and_mean_std():
    a = metrics.UnlearningMetrics(UA=100, RA=99, TA=97, TA_all=90, MIA=100)
    b = metrics.UnlearningMetrics(UA=98, RA=100, TA=95, TA_all=80, MIA=96)
    assert metrics.average_gap(b, a) == pytest.approx((2 + 1 + 2 + 4) / 4)
    assert metrics.average_gap(a, a) == 0.0
    mean, std = metrics.mean_std([a.to_dict(), b.to_dict()])
    assert mean["UA"] == pytest.approx(99.0) and std["UA"] == pytest.approx(math.sqrt(2.0))
    assert "RTE" not in mean  # missing values are left out
    mean, std = metrics.mean_std([a.to_dict()])
    assert std["RA"] == 0.0
    assert metrics.UnlearningMetrics.from_dict(a.to_dict()) == a


def test_digits_splits_are_disjoint_stratified_and_seeded():
    d0, d0_again, d1 = load_dataset("digits", 0), load_dataset("digits", 0), load_dataset("digits", 1)
    assert d0.input_shape == (8, 8) and d0.num_classes == 10
    assert len(d0.train) + len(d0.val) + len(d0.test) == 1797
    assert torch.equal(d0.val.x, d0_again.val.x)
    assert not torch.equal(d0.val.y, d1.val.y) or not torch.equal(d0.val.x, d1.val.x)
    assert torch.equal(d0.test.x, d1.test.x)  # the test split does not depend on the seed
    assert float(d0.train.x.max()) <= 1.0
    assert set(d0.val.y.tolist()) == set(range(10))


def test_mnist1d_is_generated_locally_and_leaves_global_rngs_alone():
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    data = load_dataset("mnist1d", 0)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert data.input_shape == (40,) and len(data.test) == 1000
    assert len(data.train) + len(data.val) == 4000


def test_scenarios():
    data = load_dataset("digits", 0)
    cw = make_scenario(data, "class", forget_class=3)
    assert bool((cw.forget.y == 3).all()) and not bool((cw.retain.y == 3).any())
    assert len(cw.forget) + len(cw.retain) == len(data.train)
    assert not bool((cw.kept(data.test).y == 3).any())
    rnd = make_scenario(data, "random", seed=0)
    assert len(rnd.forget) == round(0.1 * len(data.train))
    assert len(rnd.forget) + len(rnd.retain) == len(data.train)
    assert rnd.kept(data.test) is data.test
    with pytest.raises(ValueError):
        make_scenario(data, "class", forget_class=10)


@pytest.mark.parametrize("shape", [(8, 8), (40,)])
@pytest.mark.parametrize("model_cls", [MLP, SmallCNN])
def test_models_map_inputs_to_logits(model_cls, shape):
    model = model_cls(shape, 10)
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_trained_models_are_cached(tmp_path):
    torch.manual_seed(0)
    split = labelled_split([0, 1, 2, 3] * 8)
    recipe = TrainRecipe(epochs=2, batch_size=16)
    key = cache_key(role="original", dataset="toy", architecture="mlp", seed=0)

    def make():
        torch.manual_seed(0)
        return MLP((2,), NUM_CLASSES, hidden=8)

    first = load_or_train(tmp_path, key, make, lambda m: train_classifier(m, split, recipe, 0))
    second = load_or_train(tmp_path, key, make, lambda m: pytest.fail("must come from the cache"))
    assert not first.from_cache and second.from_cache
    assert second.train_seconds == pytest.approx(first.train_seconds)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_memory_probe_counts_new_tensors_not_in_place_updates():
    existing = torch.zeros(1000)
    kept = []

    def work():
        existing.add_(1.0)  # in place: no new memory
        scratch = torch.ones(250_000)  # 1 MB, freed on return
        kept.append(torch.ones(1000))  # 4 kB that outlive the block
        return float(scratch.sum())

    probe = memory.memory_probe("cpu")
    result, use = probe.measure(work)
    assert result == 250_000.0 and use.peak_bytes >= 1_000_000 and use.net_bytes == 4000
    assert probe.measure(lambda: existing.mul_(2.0))[1].peak_bytes < 64  # at most a wrapped scalar
    assert memory.peak_tensor_mib(lambda: torch.ones(2 ** 18), "cpu")[1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_scenario() -> Scenario:
    torch.manual_seed(0)
    x = torch.randn(120, 6)
    y = torch.randint(0, NUM_CLASSES, (120,))
    train = Split(x, y)
    mask = y == 0
    return Scenario("class", 0, train.where(mask), train.where(~mask))


@pytest.mark.parametrize("name", [*(m.name for m in unlearning.SUPPORTED), "eupmu"])
def test_every_method_runs_and_records(name, tiny_scenario):
    spec = methods.resolve(name)
    torch.manual_seed(0)
    model = MLP((6,), NUM_CLASSES, hidden=16)
    before = [p.detach().clone() for p in model.parameters()]
    schedule = unlearning.Schedule(epochs_override=1, retain_batch=32, forget_batch=8)
    run = unlearning.unlearn(spec, methods.Hyper(*spec.default), model, tiny_scenario, NUM_CLASSES, schedule,
                             seed=0, trace_points=2)
    assert run.steps == math.ceil(len(tiny_scenario.retain) / 32)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert run.seconds >= 0.0 and run.trace["step"] == [0.0, float(round(run.steps / 2)), float(run.steps)]
    assert all(len(values) == run.steps for values in run.per_step.values())
    if spec.family == "implicit":
        assert "w" in run.per_step
    if spec.family == "explicit":
        assert "lambda" in run.per_step


def test_method_names():
    assert methods.resolve("eupmu").name == f"eupmu-{methods.DEFAULT_DUAL}"
    assert methods.resolve("eupmu", dual="paper").name == "eupmu-paper"
    # the image benchmark's eupmu is its protocol-v2 configuration; an explicit dual still picks the preset
    assert methods.resolve("eupmu", image=True).name == methods.IMAGE_EUPMU == "eupmu-length"
    assert methods.resolve("eupmu", dual="reference", image=True).name == "eupmu-reference"
    assert methods.resolve("eupmu_implicit", image=True).name == "eupmu-length"
    assert set(methods.EUPMU_PRESETS) == {"eupmu-paper", "eupmu-reference", "eupmu-length"}
    assert not set(methods.BASELINES) & set(methods.EUPMU_PRESETS)
    assert set(methods.BASELINES) | set(methods.EUPMU_PRESETS) == set(methods.METHODS)
    assert methods.resolve("eupmu_explicit").name == "ungrad" and methods.resolve("npo_graddiff").name == "npo-graddiff"
    with pytest.raises(ValueError, match="unknown method"):
        methods.resolve("nope")
    # images run every method but SimNPO, whose length-normalised likelihood is defined on token sequences
    assert [m.name for m in unlearning.SUPPORTED] == [name for name in methods.METHODS if name != "simnpo"]


def test_registry_is_consistent():
    for m in methods.METHODS.values():
        assert m.family in methods.FAMILIES and m.forget_loss in (None, *losses.FORGET_LOSSES)
        assert m.family != "plain" or m.option in methods.PLAIN_OBJECTIVES
        assert len(m.knob_grid) == 3 and m.default[0] > 0


def test_selection_lookup_fallbacks_and_overrides(tmp_path):
    path = tmp_path / "hparams.json"
    spec = methods.resolve("ungrad")

    def mine():
        return selection.Selections((("mine", selection.load_selection(path)),))

    assert selection.choose(spec, mine(), "digits/class/mlp").hyper == methods.Hyper(*spec.default)
    selection.store_entry(path, "digits/class/mlp", {"methods": {"ungrad": {"lr": 0.5, "knob": 2.0}}}, {"note": "x"})
    assert selection.load_selection(path)["note"] == "x"
    assert selection.choose(spec, mine(), "digits/class/mlp").hyper == methods.Hyper(0.5, 2.0)
    assert selection.choose(spec, mine(), "digits/random/mlp").source == "mine digits/class/mlp"
    chosen = selection.choose(spec, mine(), "digits/class/mlp", lr=0.1, tolerance=0.3)
    assert chosen.hyper == methods.Hyper(0.1, 0.3) and "overridden" in chosen.source
    ref = methods.resolve("eupmu-reference")
    assert selection.choose(ref, mine(), "digits/class/mlp", tolerance=-0.02).hyper.knob == pytest.approx(0.02)
    paper = methods.resolve("eupmu-paper")  # tuned on dual_lr; the tolerance rides along
    assert selection.choose(paper, mine(), "digits/class/mlp", tolerance=0.4).hyper.tolerance == 0.4
    selection.store_entry(path, "digits/class/mlp", {"methods": {"ft": {"lr": 0.2, "knob": 5}}}, {})
    merged = selection.load_selection(path)["selections"]["digits/class/mlp"]["methods"]
    assert set(merged) == {"ungrad", "ft"}  # a partial sweep keeps the other methods


def test_an_exact_key_wins_over_the_other_scenario_in_any_file(tmp_path):
    user = tmp_path / "user.json"
    selection.store_entry(user, "digits/random/mlp", {"methods": {"ft": {"lr": 0.5, "knob": 2}}}, {})
    both = selection.Selections.for_run(user, "user.json")
    assert selection.choose(methods.resolve("ft"), both, "digits/class/mlp").source == \
        "package selection digits/class/mlp"
    assert selection.choose(methods.resolve("ft"), both, "digits/random/mlp").source == \
        "selection file user.json digits/random/mlp"


def test_markdown_table_and_target_check():
    def row(label, ua, ra, ta, gap):
        m = {"UA": ua, "RA": ra, "TA": ta, "MIA": ua, "gap": gap}
        return {"label": label, "per_seed": [m, m], "mean": m, "std": {k: 0.0 for k in m}}

    record = {"reference": {"retrain": row("Retrain", 100, 99, 97, 0.0)},
              "methods": {"eupmu": row("EUPMU", 99, 98.5, 96.5, 0.4), "ga": row("GA", 50, 60, 60, 30.0)}}
    text = report.markdown_table(record)
    assert "| Retrain (`retrain`) " in text and "**0.40 ± 0.00**" in text
    check = report.target_check(record, "eupmu")
    assert all("ok" in line for line in check[:3]) and "better" in check[3]
    assert json.dumps(record)  # records stay JSON-serialisable
