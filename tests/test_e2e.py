"""End to end: the ``eupmu-unlearn`` command line on a tiny budget, with its JSON output checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from eupmu_unlearn import cli
from eupmu_unlearn.evaluation.selection import package_selection

TINY = ["--train-epochs", "3", "--epochs", "1", "--quiet", "--threads", "1"]


def test_one_method_through_the_console_entry_point(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eupmu_unlearn", "--methods", "eupmu", "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "| Method " in done.stdout and "target check for eupmu" in done.stdout

    record = json.loads((out / "digits_class.json").read_text())
    assert record["config"]["dataset"] == "digits" and record["config"]["seeds"] == [0]
    assert record["scenario"] == "class-wise forgetting of class 0"
    row = record["methods"]["eupmu"]
    for key in ("UA", "RA", "TA", "TA_all", "MIA", "RTE", "peak_tensor_mib", "gap"):
        assert key in row["mean"] and key in row["per_seed"][0]
    assert 0.0 <= row["mean"]["UA"] <= 100.0 and row["mean"]["RTE"] > 0.0 and row["mean"]["peak_tensor_mib"] > 0.0
    assert row["hyper"]["lr"] > 0.0
    assert record["reference"]["retrain"]["mean"]["gap"] == 0.0
    assert record["reference"]["original"]["mean"]["UA"] < 50.0  # the original still knows class 0
    path = record["trajectories"]["eupmu"]
    assert len(path["w"]) == len(path["forget_loss"]) > 0 and path["step"][0] == 0.0
    assert (out / "digits_class_tradeoff.png").stat().st_size > 10_000
    assert any((tmp_path / "cache").glob("original-digits-mlp-0-*.pt"))


def test_several_seeds_methods_and_the_table_command(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--seeds", "0,1", "--methods", "ungrad,ft", "--scenario", "random", "--no-cache", "--no-plot",
            "--no-memory", "--lr", "0.01", "--tolerance", "0.5", "--out", str(out), *TINY]
    threads = torch.get_num_threads()
    assert cli.main(args) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    record = json.loads((out / "digits_random.json").read_text())
    assert list(record["methods"]) == ["ungrad", "ft"]
    ungrad = record["methods"]["ungrad"]
    assert len(ungrad["per_seed"]) == 2 and set(ungrad["std"]) >= {"UA", "RA", "TA", "MIA", "gap"}
    assert ungrad["hyper"] == {"lr": 0.01, "tolerance": 0.5} and "overridden" in ungrad["hyper_source"]
    assert ungrad["mean"].get("peak_tensor_mib") is None
    capsys.readouterr()
    assert cli.main(["table", str(out / "digits_random.json")]) == 0
    assert "UNGrad (explicit) (`ungrad`)" in capsys.readouterr().out


def test_sweep_stores_a_selection(tmp_path):
    target = tmp_path / "hparams.json"
    args = ["sweep", "--methods", "ft", "--seeds", "0", "--lrs", "0.01", "--train-epochs", "3", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(target), "--quiet"]
    assert cli.main(args) == 0
    entry = json.loads(target.read_text())["selections"]["digits/class/mlp"]
    assert entry["heldout"] == "val" and entry["seeds"] == [0]
    choice = entry["methods"]["ft"]
    assert choice["lr"] == 0.01 and choice["knob"] in (2, 5, 10) and len(choice["grid"]) == 3


def test_unknown_method_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--methods", "eupmu,bogus", "--quiet", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and "unknown method 'bogus'" in capsys.readouterr().err


def test_the_packaged_selection_covers_the_reported_scenarios():
    selections = package_selection()["selections"]
    assert {"digits/class/mlp", "mnist1d/class/cnn", "mnist1d/random/cnn"} <= set(selections)
    for entry in selections.values():
        assert entry["heldout"] == "val"
        for choice in entry["methods"].values():
            assert choice["lr"] > 0.0
