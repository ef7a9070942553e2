"""Protocol v2 (``eupmu-unlearn suite``), the SalUn and l1-sparse baselines, update-space UNGrad
in the benchmark, and the ``update-space`` command."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from eupmu_unlearn import cli
from eupmu_unlearn import methods
from eupmu_unlearn.evaluation import runner, suite, unlearning
from eupmu_unlearn.evaluation import update_space as update_space_module
from eupmu_unlearn.evaluation.data import Scenario, Split
from eupmu_unlearn.evaluation.metrics import accuracy
from eupmu_unlearn.evaluation.models import MLP
from eupmu_unlearn.evaluation.unlearning import IndexStream
from eupmu_unlearn.loop import PlainExtras, saliency_mask


# ---------------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("dataset,scenario", [("digits", "class"), ("mnist1d", "class"), ("mnist1d", "random")])
def test_tuning_contexts_never_share_a_seed_or_target_with_the_reported_ones(dataset, scenario):
    protocol = suite.make_protocol(dataset, scenario)
    for fold in protocol.folds:
        assert {c.seed for c in fold.tuning}.isdisjoint({c.seed for c in fold.reported})
        assert {c.target for c in fold.tuning}.isdisjoint({c.target for c in fold.reported})
    reported = protocol.reported
    assert len(set(reported)) == len(reported)
    assert {c.seed for c in reported} == set(suite.REPORTED_SEEDS)
    if scenario == "class":  # every class is reported, with every reporting seed
        assert len(reported) == 10 * 3 and {c.target for c in reported} == set(range(10))
    else:
        assert len(reported) == 3 * 3 and {c.target for c in reported} == set(suite.REPORTED_SUBSETS)


def test_overlapping_tuning_and_reported_data_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="seeds overlap"):
        suite.make_protocol("digits", "class", tuning_seeds=(0, 100))
    with pytest.raises(ValueError, match="targets overlap"):
        suite.make_protocol("mnist1d", "random", tuning_subsets=(2, 100))
    fold = suite.Fold((suite.Context(100, 3),), (suite.Context(0, 3),))
    with pytest.raises(ValueError, match="targets overlap"):
        suite.Protocol("digits", "class", (fold,)).check_disjoint()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["suite", "--tuning-seeds", "1,100", "--dry-run"])
    assert stopped.value.code == 2 and "overlap" in capsys.readouterr().err


def test_suite_dry_run_prints_the_protocol_and_does_no_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "prepare_seed", lambda *a, **k: pytest.fail("the dry run started working"))
    out = tmp_path / "out"
    assert cli.main(["suite", "--dataset", "mnist1d", "--dry-run", "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [p["scenario"] for p in shown] == ["class", "random"] and not out.exists()
    per_method = {m: len(methods.LR_GRID) * 3 for m in suite.SUITE_METHODS}
    # mnist1d's default tuning budget: seed 100, one class of the other fold (2 contexts); 2 subsets
    assert shown[0]["version"] == 2 and shown[0]["tuning_runs"] == sum(per_method.values()) * 2
    assert shown[1]["tuning_runs"] == sum(per_method.values()) * 2
    assert shown[0]["reported_runs"] == len(suite.SUITE_METHODS) * 30


def test_suite_jobs_default_to_the_usable_cores_capped(monkeypatch):
    for cores, jobs in ((1, 1), (2, 2), (64, cli.MAX_DEFAULT_JOBS)):
        monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert cli.default_jobs() == jobs
        assert cli.build_parser().parse_args(["suite"]).jobs == jobs


def test_tiny_suite_writes_the_run_layout(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    selection = tmp_path / "hparams.json"
    assert cli.main(["suite", "--tiny", "--methods", "eupmu,salun,rl", "--quiet", "--no-plot", "--out", str(out),
                     "--cache-dir", str(cache), "--selection-out", str(selection), "--jobs", "1"]) == 0
    record = json.loads((out / "suite_digits_class.json").read_text())
    assert record["config"]["protocol_version"] == 2 and record["protocol"]["note"]
    assert record["contexts"] == [{"seed": 0, "forget_class": 0}, {"seed": 0, "forget_class": 1}]
    assert record["reference"]["retrain"]["mean"]["gap"] == 0.0
    for name in ("eupmu-length", "salun"):  # "eupmu" is recorded under the benchmark's EUPMU configuration
        row = record["methods"][name]
        assert len(row["per_seed"]) == 2 and set(row["per_target"]) == {"0", "1"}
        assert row["mean"]["gap"] == pytest.approx(sum(r["gap"] for r in row["per_seed"]) / 2)
        assert len(record["chosen"][name]["folds"]) == 2
    assert [p["knob"] for p in record["tuning"]["rl"]] == [2, 5, 10]  # one lr (tiny), rl's lengths
    assert record["summary"]["eupmu_default_by_tuning"] == "eupmu-length"  # the only preset it ran
    assert "| Method" in capsys.readouterr().out
    stored = json.loads(selection.read_text())["selections"]["digits/class/mlp"]
    assert stored["protocol_version"] == 2 and set(stored["methods"]) == {"eupmu-length", "salun", "rl"}
    capsys.readouterr()
    path = str(out / "suite_digits_class.json")
    assert cli.main(["table", path, path]) == 0  # the run layout: table reads it, and adds the suite tables
    shown = capsys.readouterr().out
    assert "SalUn (`salun`)" in shown and "side by side" in shown and "worst class" in shown


# ---------------------------------------------------------------------------------- the new baselines


def test_saliency_mask_keeps_the_largest_gradients():
    a, b = torch.zeros(4, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    a.grad = torch.tensor([0.1, -5.0, 0.2, 3.0])
    b.grad = torch.tensor([[4.0, 0.0, -0.3], [0.0, 0.0, 1.0]])
    mask_a, mask_b = saliency_mask([a, b], 0.4)  # 4 of 10 weights: |g| = 5, 4, 3, 1
    assert mask_a.tolist() == [0.0, 1.0, 0.0, 1.0] and mask_b.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="keep"):
        saliency_mask([a], 0.0)


@pytest.fixture(scope="module")
def learned():
    """A small MLP that has learned a separable 4-class problem; class 0 is to be forgotten."""
    gen = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 8, generator=gen)
    y = torch.arange(4).repeat_interleave(60)
    x = centres[y] + 0.5 * torch.randn(240, 8, generator=gen)
    data = Split(x, y)
    train = Scenario("class", 0, data.where(y == 0), data.where(y != 0))
    torch.manual_seed(0)
    model = MLP((8,), 4, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert accuracy(model, train.forget) == 100.0
    return model, train


@pytest.mark.parametrize("name,hyper", [("salun", (0.01, 0.5)), ("l1-sparse", (0.05, 0.03))])
def test_new_baselines_forget_the_class_and_keep_the_rest(name, hyper, learned):
    model, scenario = copy.deepcopy(learned[0]), learned[1]
    schedule = unlearning.Schedule(epochs=5, forget_batch=16, retain_batch=32)
    before = [p.detach().clone() for p in model.parameters()]
    unlearning.unlearn(methods.resolve(name), methods.Hyper(*hyper), model, scenario, 4, schedule, seed=0)
    assert accuracy(model, scenario.forget) <= 10.0  # forgotten: the class is mostly misclassified
    assert accuracy(model, scenario.retain) >= 90.0
    if name == "salun":  # only the salient half of the weights moved
        moved = sum(int((p != q).sum()) for p, q in zip(model.parameters(), before))
        total = sum(p.numel() for p in before)
        assert 0 < moved <= math.ceil(0.5 * total)


def test_l1_penalty_decays_linearly_and_shrinks_the_weights(learned):
    extras = PlainExtras(l1=0.5, steps=4)
    assert [extras.l1_at(k) for k in range(1, 6)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    norms = {}
    for name, hyper in (("ft", (0.05, 1)), ("l1-sparse", (0.05, 0.05))):
        model = copy.deepcopy(learned[0])
        schedule = unlearning.Schedule(epochs=1, forget_batch=16, retain_batch=32)
        unlearning.unlearn(methods.resolve(name), methods.Hyper(*hyper), model, learned[1], 4, schedule, seed=0)
        norms[name] = sum(float(p.detach().abs().sum()) for p in model.parameters())
    assert norms["l1-sparse"] < 0.97 * norms["ft"]  # same batches: only the penalty differs


def test_every_batch_is_full_and_every_pass_a_permutation():
    stream = IndexStream(10, 4, torch.Generator().manual_seed(0))
    batches = [stream.next().tolist() for _ in range(10)]
    assert all(len(set(b)) == 4 for b in batches)
    flat = sum(batches, [])
    assert all(sorted(flat[i:i + 10]) == list(range(10)) for i in range(0, 40, 10))


# ---------------------------------------------------------------------------------- update space


def test_update_space_keeps_the_applied_update_from_raising_the_retain_loss(tmp_path):
    rows = update_space_module.run(forget_class=7, seed=0, steps=20, cache_dir=tmp_path / "cache")
    by = {(r["rule"], r["space"]): r for r in rows if "violations" in r}
    for rule, _ in update_space_module.RULES:
        assert by[(rule, "update")]["violations"] == 0
    assert by[("SGD, momentum 0.9", "gradient")]["violations"] > 0  # momentum carries old directions on
    assert by[("Adam", "gradient")]["violations"] > 0
    text = update_space_module.markdown(rows, 7, 0, 20)
    assert "| base rule" in text and "update" in text


@pytest.mark.parametrize("name", ["rl", "pcgrad"])
def test_a_copy_taken_on_the_way_equals_a_shorter_run(name, learned):
    """What run_method_lengths relies on: the suite evaluates a length knob on the way of one run."""
    spec, schedule = methods.resolve(name), unlearning.Schedule(forget_batch=16, retain_batch=32)
    copies = {}
    long = copy.deepcopy(learned[0])
    unlearning.unlearn(spec, methods.Hyper(0.01, 2), long, learned[1], 4, schedule, seed=0,
                       on_step=lambda k, m: copies.setdefault(k, copy.deepcopy(m)) if k == 7 else None)
    short = copy.deepcopy(learned[0])
    unlearning.unlearn(spec, methods.Hyper(0.01, 2), short, learned[1], 4, schedule, seed=0, max_steps=7)
    assert all(torch.equal(p, q) for p, q in zip(copies[7].parameters(), short.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(long.parameters(), short.parameters()))
