"""Bad command lines end before any work with one line on stderr and exit status 2.

Covers ``eupmu-unlearn`` (run, ``sweep`` and ``table``), ``eupmu-unlearn-llm`` and ``eupmu-bench``.
"No work" is checked directly: the functions that would train, load a model or time anything
are replaced by ones that record the call, and the output folder must not have been created.
A few good command lines are run too, on tiny budgets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from eupmu_unlearn import cli as unlearn_cli
from eupmu_unlearn import cli_args
from eupmu_unlearn.evaluation import runner
from eupmu_unlearn.evaluation import sweep as sweep_module
from eupmu_unlearn.evaluation import selection
from eupmu_unlearn.evaluation.data import NUM_CLASSES, load_dataset
from eupmu_unlearn.methods import METHODS
from eupmu_unlearn.llm import cli as llm_cli
from eupmu_unlearn.llm import model as llm_model
from eupmu_unlearn.llm import pipeline as llm_pipeline
from eupmu_unlearn.llm import report as llm_report

METHOD_NAMES = tuple(METHODS)
IMAGE_METHOD_NAMES = tuple(name for name in METHODS if name != "simnpo")  # SimNPO is defined on token sequences
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
TINY_RUN = ["--train-epochs", "3", "--epochs", "1", "--threads", "1", "--no-cache", "--no-memory", "--quiet"]


@pytest.fixture
def work(monkeypatch) -> list[str]:
    """Replaces every entry into real work by a stub that records its name (and fails loudly)."""
    calls: list[str] = []

    def stub(name: str) -> Callable:
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: the command started working")

        return called

    for module, name in ((runner, "run_benchmark"), (runner, "prepare_seed"), (runner, "load_dataset"),
                         (sweep_module, "sweep"), (sweep_module, "prepare_seed"), (sweep_module, "store_entry"),
                         (llm_pipeline, "run_pipeline"), (llm_pipeline, "run_seeds"), (llm_model, "load_smollm2")):
        monkeypatch.setattr(module, name, stub(f"{module.__name__}.{name}"))
    try:
        from eupmu_bench import cli as bench_cli
    except ImportError:
        pass
    else:
        monkeypatch.setattr(bench_cli, "run", stub("eupmu_bench.cli.run"))
    return calls


def usage_error(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys, *fragments: str) -> str:
    """Run ``main(argv)``: exit status 2, nothing on stdout, one line on stderr holding every fragment."""
    with pytest.raises(SystemExit) as stopped:
        main(list(argv))
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert "Traceback" not in captured.err and captured.out == ""
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def a_file(tmp_path: Path, name: str = "file.txt", data: bytes = b"not a folder") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------- eupmu-unlearn

UNLEARN_CASES = {
    "seeds not integers": (["--seeds", "a,b"], "--seeds", "must be an integer, got 'a'"),
    "seed negative": (["--seed", "-1"], "--seed", "must be in [0, 4294967295], got -1"),
    "seeds empty element": (["--seeds", "0,,1"], "--seeds", "empty element"),
    "seeds repeated": (["--seeds", "0,1,0"], "--seeds", "repeats '0'"),
    "unknown method": (["--methods", "nosuch"], "--methods", "unknown method 'nosuch'"),
    "one unknown method": (["--methods", "eupmu,bogus"], "--methods", "unknown method 'bogus'"),
    "forget class too large": (["--forget-class", "12"], "--forget-class", "[0, 9] for digits (10 classes), got 12"),
    "forget class of mnist1d": (["--dataset", "mnist1d", "--forget-class", "10"], "--forget-class", "for mnist1d"),
    "forget class negative": (["--forget-class", "-1"], "--forget-class", "must be >= 0"),
    "negative lr": (["--lr", "-0.1"], "--lr", "must be > 0, got -0.1"),
    "zero lr": (["--lr", "0"], "--lr", "must be > 0"),
    "negative lr in scientific notation": (["--lr", "-1e-3"], "--lr", "must be > 0, got -0.001"),
    "nan lr": (["--lr", "nan"], "--lr", "finite"),
    "lr not a number": (["--lr", "fast"], "--lr", "must be a number, got 'fast'"),
    "zero epochs": (["--epochs", "0"], "--epochs", "must be >= 1, got 0"),
    "zero train epochs": (["--train-epochs", "0"], "--train-epochs", "must be >= 1"),
    "negative threads": (["--threads", "-2"], "--threads", "must be >= 0"),
    "infinite tolerance": (["--tolerance", "inf"], "--tolerance", "finite"),
    "negative tolerance for explicit surgery": (["--methods", "eupmu,ungrad", "--tolerance", "-0.5"], "--tolerance",
                                                "must be >= 0 for ungrad"),
    "unknown device": (["--device", "nosuch"], "--device", "not a device: 'nosuch'"),
    "unknown dataset": (["--dataset", "cifar"], "--dataset", "invalid choice"),
    "unknown option": (["--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("case", sorted(UNLEARN_CASES))
def test_unlearn_rejects_bad_arguments_before_any_work(case, tmp_path, capsys, work) -> None:
    argv, *fragments = UNLEARN_CASES[case]
    out = tmp_path / "out"
    usage_error(unlearn_cli.main, [*argv, "--out", str(out)], capsys, *fragments)
    assert work == [] and not out.exists()


def test_unlearn_negative_tolerance_is_fine_for_implicit_methods(tmp_path, work) -> None:
    args = unlearn_cli.parse_run_arguments(["--methods", "eupmu-reference", "--tolerance", "-0.03",
                                            "--out", str(tmp_path / "out")])
    assert args.tolerance == -0.03 and work == []


def test_unlearn_cuda_device_without_cuda(tmp_path, capsys, work) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    usage_error(unlearn_cli.main, ["--device", "cuda", "--out", str(tmp_path / "out")], capsys,
                "--device", "no CUDA device")
    assert work == []


def test_unlearn_rejects_an_unwritable_out_before_any_work(tmp_path, capsys, work) -> None:
    blocker = a_file(tmp_path)
    usage_error(unlearn_cli.main, ["--out", str(blocker / "run")], capsys, "--out", "cannot create the directory")
    usage_error(unlearn_cli.main, ["--out", str(blocker)], capsys, "--out", "is not a directory")
    assert work == []


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="permissions do not stop root")
def test_unlearn_rejects_a_read_only_out(tmp_path, capsys, work) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        usage_error(unlearn_cli.main, ["--out", str(read_only)], capsys, "--out", "cannot write")
    finally:
        read_only.chmod(0o700)
    assert work == []


def test_unlearn_checks_the_selection_and_cache_files(tmp_path, capsys, work) -> None:
    out = tmp_path / "out"
    usage_error(unlearn_cli.main, ["--selection", str(tmp_path / "missing.json"), "--out", str(out)], capsys,
                "--selection", "no such file")
    png = a_file(tmp_path, "plot.png", PNG_BYTES)
    usage_error(unlearn_cli.main, ["--selection", str(png), "--out", str(out)], capsys,
                "--selection", "not a JSON file")
    bench = a_file(tmp_path, "bench.json", json.dumps({"records": [], "machine": {}}).encode())
    usage_error(unlearn_cli.main, ["--selection", str(bench), "--out", str(out)], capsys,
                "--selection", "not a hyperparameter selection")
    usage_error(unlearn_cli.main, ["--cache-dir", str(png), "--out", str(out)], capsys,
                "--cache-dir", "is not a directory")
    assert work == [] and not out.exists()


def test_run_is_the_default_command() -> None:
    assert unlearn_cli.parse([]).command == "run"
    assert unlearn_cli.parse(["--seeds", "0,1"]).seeds == (0, 1)
    assert unlearn_cli.parse(["run", "--methods", "eupmu,rl"]).methods == ("eupmu", "rl")
    assert unlearn_cli.parse(["sweep"]).command == "sweep"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["sweep", "--help"]])
def test_help_lists_every_method(argv, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        unlearn_cli.main(argv)
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in IMAGE_METHOD_NAMES)


def test_dry_run_resolves_the_hyperparameters_and_does_nothing_else(tmp_path, capsys, work) -> None:
    out = tmp_path / "out"
    assert unlearn_cli.main(["--dry-run", "--methods", "eupmu,ungrad,npo", "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    sources = {name: row["hyper_source"] for name, row in shown["methods"].items()}
    assert sources == {"eupmu": "package selection digits/class/mlp", "ungrad": "package selection digits/class/mlp",
                       "npo": "built-in default"}
    # on the image benchmark eupmu is eupmu-length: the stored choice has the run length as its knob
    assert shown["methods"]["eupmu"]["label"] == METHODS["eupmu-length"].label
    assert set(shown["methods"]["eupmu"]["hyper"]) == {"lr", "epochs"}
    assert shown["config"]["selection_path"] is None and work == [] and not out.exists()


def test_a_user_selection_comes_before_the_package_one(tmp_path, capsys, work) -> None:
    user = tmp_path / "mine.json"
    selection.store_entry(user, "digits/class/mlp", {"methods": {"ungrad": {"lr": 0.5, "knob": 0.25}}}, {})
    assert unlearn_cli.main(["--dry-run", "--methods", "ungrad,ft", "--selection", str(user)]) == 0
    shown = json.loads(capsys.readouterr().out)["methods"]
    assert shown["ungrad"]["hyper"] == {"lr": 0.5, "tolerance": 0.25}
    assert shown["ungrad"]["hyper_source"].startswith("selection file ") and "mine.json" in shown["ungrad"][
        "hyper_source"]
    assert shown["ft"]["hyper_source"] == "package selection digits/class/mlp"
    assert work == []


def test_dataset_class_counts_match_the_data() -> None:
    for name, classes in NUM_CLASSES.items():
        assert load_dataset(name, 0).num_classes == classes


# ---------------------------------------------------------------------------------- eupmu-unlearn table


def a_record(method: str = "ft") -> dict:
    row = {"label": method.upper(), "kind": "plain", "hyper": None, "hyper_source": "", "per_seed": [{}],
           "mean": {"UA": 1.0, "RA": 99.0, "TA": 98.0, "MIA": 2.0, "gap": 0.5}, "std": {}}
    return {"config": {"dataset": "digits", "architecture": "mlp", "seeds": [0]}, "scenario": "a scenario",
            "reference": {"retrain": {**row, "label": "Retrain"}}, "methods": {method: row}}


TABLE_INPUTS = {
    "png": (PNG_BYTES, "not a JSON file"),
    "benchmark json": (json.dumps({"records": [], "machine": {}, "bandwidth": {}}), "is an eupmu-bench result"),
    "llm json": (json.dumps({"models": {}, "environment": {}, "config": {}}), "is an eupmu-unlearn-llm result"),
    "selection json": (json.dumps({"selections": {}}), "is a hyperparameter selection"),
    "json list": ("[1, 2]", "holds a JSON list"),
    "other json": (json.dumps({"config": {}}), "is not an eupmu-unlearn result"),
    "malformed rows": (json.dumps({**a_record(), "methods": {"ft": {"label": "FT"}}}), "malformed 'methods' rows"),
}


@pytest.mark.parametrize("case", sorted(TABLE_INPUTS))
def test_table_recognises_what_it_was_given(case, tmp_path, capsys) -> None:
    content, problem = TABLE_INPUTS[case]
    path = tmp_path / "given.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(a_record()))
    # every file is checked before anything is printed
    line = usage_error(unlearn_cli.main, ["table", str(good), str(path)], capsys, str(path), problem)
    assert line.startswith("eupmu-unlearn table: error: ")


def test_table_of_a_missing_file_or_a_folder(tmp_path, capsys) -> None:
    usage_error(unlearn_cli.main, ["table", str(tmp_path / "none.json")], capsys, "none.json", "no such file")
    usage_error(unlearn_cli.main, ["table", str(tmp_path)], capsys, "is a directory")


def test_table_prints_a_result(tmp_path, capsys) -> None:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(a_record("rl")))
    assert unlearn_cli.main(["table", str(path)]) == 0
    assert "| RL (`rl`) " in capsys.readouterr().out


# ---------------------------------------------------------------------------------- eupmu-unlearn sweep

SWEEP_CASES = {
    "bad lr grid": (["--lrs", "0.01,-1"], "--lrs", "must be > 0, got -1"),
    "unknown method": (["--methods", "ft,nosuch"], "--methods", "unknown method 'nosuch'"),
    "method twice through its alias": (["--methods", "eupmu,eupmu-length"], "--methods", "twice"),
    "forget class": (["--forget-class", "10"], "--forget-class", "[0, 9]"),
    "seeds": (["--seeds", "1.5"], "--seeds", "must be an integer"),
    "epochs": (["--epochs", "0"], "--epochs", "must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_CASES))
def test_sweep_rejects_bad_arguments_before_any_work(case, tmp_path, capsys, work) -> None:
    argv, *fragments = SWEEP_CASES[case]
    target = tmp_path / "sub" / "hparams.json"
    usage_error(unlearn_cli.main, ["sweep", *argv, "--out", str(target)], capsys, *fragments)
    assert work == [] and not target.parent.exists()


def test_sweep_checks_the_selection_file_it_would_update(tmp_path, capsys, work) -> None:
    bench = a_file(tmp_path, "results.json", json.dumps({"records": [], "machine": {}}).encode())
    usage_error(unlearn_cli.main, ["sweep", "--out", str(bench)], capsys, "--out", "not a hyperparameter selection")
    blocker = a_file(tmp_path)
    usage_error(unlearn_cli.main, ["sweep", "--out", str(blocker / "hparams.json")], capsys, "--out",
                "is not a directory")
    usage_error(unlearn_cli.main, ["sweep", "--out", str(tmp_path)], capsys, "--out", "is a directory")
    assert work == []


# ---------------------------------------------------------------------------------- eupmu-unlearn-llm

LLM_CASES = {
    "unknown method": (["--methods", "nosuch"], "--methods", "unknown method 'nosuch'"),
    "repeated method": (["--methods", "ga,npo,ga"], "--methods", "repeats 'ga'"),
    "zero steps": (["--steps", "0"], "--steps", "must be >= 1, got 0"),
    "negative lr": (["--lr", "-1e-5"], "--lr", "must be > 0"),
    "zero dual lr": (["--dual-lr", "0"], "--dual-lr", "must be > 0"),
    "zero epochs": (["--epochs", "0"], "--epochs", "must be >= 1"),
    "zero threads": (["--threads", "0"], "--threads", "must be >= 1"),
    "seed not an integer": (["--seed", "x"], "--seed", "must be an integer"),
    "negative tolerance for explicit surgery": (["--tolerance", "-0.1"], "--tolerance",
                                                "must be >= 0 for ungrad"),
    "unknown dual rule": (["--dual", "famo"], "--dual", "invalid choice"),
    "random labels on text": (["--methods", "ga,rl"], "--methods", "unknown method 'rl'"),
    "method twice": (["--methods", "eupmu,eupmu-reference"], "--methods", "twice"),
    "unknown split": (["--split", "dev"], "--split", "unknown split 'dev'; choose from test, validation"),
    "unknown model": (["--model", "gpt"], "--model", "unknown model 'gpt'; choose from smollm2, tiny"),
    "seed and seeds": (["--seed", "1", "--seeds", "0,1"], "--seeds", "either --seed or --seeds"),
    "repeated seeds": (["--seeds", "0,1,0"], "--seeds", "repeats '0'"),
    "empty seed in list": (["--seeds", "0,,1"], "--seeds", "empty element"),
}


def test_llm_help_lists_its_methods(capsys) -> None:
    with pytest.raises(SystemExit):
        llm_cli.main(["--help"])
    out = capsys.readouterr().out
    text_methods = [name for name, m in METHODS.items() if name != "rl" and not m.image_only]
    assert all(f"  {name} " in out for name in text_methods) and "ungrad-hf" in out
    assert not any(f"  {name} " in out for name, m in METHODS.items() if m.image_only)  # salun, l1-sparse, ...


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_llm_rejects_bad_arguments_before_any_work(case, tmp_path, capsys, work) -> None:
    argv, *fragments = LLM_CASES[case]
    out = tmp_path / "out"
    usage_error(llm_cli.main, [*argv, "--out", str(out)], capsys, *fragments)
    assert work == [] and not out.exists()


def test_llm_rejects_an_unwritable_out_and_a_cache_file(tmp_path, capsys, work) -> None:
    blocker = a_file(tmp_path)
    usage_error(llm_cli.main, ["--quick", "--out", str(blocker / "llm")], capsys, "--out", "cannot create")
    usage_error(llm_cli.main, ["--quick", "--cache-dir", str(blocker), "--out", str(tmp_path / "out")], capsys,
                "--cache-dir", "is not a directory")
    assert work == [] and not (tmp_path / "out").exists()


def test_llm_good_arguments_reach_the_pipeline(tmp_path, capsys, monkeypatch) -> None:
    seen = {}

    def fake_pipeline(cfg, out, cache_dir, progress):
        seen.update(cfg=cfg, out=out)
        return {}

    monkeypatch.setattr(llm_model, "gguf_available", lambda: True)
    monkeypatch.setattr(llm_pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(llm_report, "markdown_table", lambda record: "table")
    out = tmp_path / "deep" / "out"
    assert llm_cli.main(["--quick", "--methods", "ga,eupmu_implicit_hf", "--steps", "2", "--tolerance", "-0.1",
                         "--out", str(out)]) == 0
    cfg = seen["cfg"]
    assert cfg.methods == ("ga", "eupmu_implicit_hf") and cfg.unlearn.steps == 2 and cfg.unlearn.tolerance == -0.1
    assert seen["out"] == out and out.is_dir() and list(out.iterdir()) == []  # created, the probe removed


def test_llm_results_are_written_atomically(tmp_path, monkeypatch) -> None:
    def broken_plot(record, path):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("plot failed")

    monkeypatch.setattr(llm_report, "markdown_table", lambda record: "table\n")
    monkeypatch.setattr(llm_report, "plot", broken_plot)
    (tmp_path / "tradeoff.png").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="plot failed"):
        llm_report.write_results({"a": 1}, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert (tmp_path / "tradeoff.png").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.md", "tradeoff.png"]


# ---------------------------------------------------------------------------------- eupmu-bench

BENCH_CASES = {
    "zero repeats": (["--repeats", "0"], "--repeats", "must be >= 1, got 0"),
    "negative warmup": (["--warmup", "-1"], "--warmup", "must be >= 0"),
    "zero size": (["--sizes", "1e6", "0"], "--sizes", "must be >= 1"),
    "size not a number": (["--sizes", "abc"], "--sizes", "whole number"),
    "fractional bandwidth size": (["--bandwidth-numel", "1.5"], "--bandwidth-numel", "whole number"),
    "zero threads": (["--threads", "0"], "--threads", "must be >= 1"),
    "negative seed": (["--seed", "-1"], "--seed", "must be in [0, "),
    "unknown method": (["--methods", "nosuch"], "--methods", "unknown method 'nosuch'"),
    "all and more": (["--methods", "all", "naive"], "--methods", "'all' cannot be combined"),
    "unknown device": (["--device", "tpu9"], "--device", "not a device"),
    "unknown dtype": (["--dtypes", "fp8"], "--dtypes", "unknown dtype 'fp8'"),
    "unknown backend": (["--backends", "torch", "opencl"], "--backends", "unknown backend 'opencl'"),
    "unknown backend in a comma list": (["--backends", "torch,opencl"], "--backends", "unknown backend 'opencl'"),
    "unknown model": (["--models", "bert"], "--models", "unknown model 'bert'"),
}


def test_bench_lists_are_comma_separated_and_older_space_separated_lists_still_work() -> None:
    bench_cli = pytest.importorskip("eupmu_bench.cli")
    commas = bench_cli.build_parser().parse_args(["--sizes", "1e6,2e7", "--dtypes", "float32,bf16"])
    words = bench_cli.build_parser().parse_args(["--sizes", "1e6", "2e7", "--dtypes", "float32", "bf16"])
    assert commas.sizes == words.sizes == (1_000_000, 20_000_000) and commas.dtypes == words.dtypes


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_rejects_bad_arguments_before_any_work(case, tmp_path, capsys, work) -> None:
    bench_cli = pytest.importorskip("eupmu_bench.cli")
    argv, *fragments = BENCH_CASES[case]
    out = tmp_path / "out"
    usage_error(bench_cli.main, ["--device", "cpu", *argv, "--out", str(out)], capsys, *fragments)
    assert work == [] and not out.exists()


def test_bench_rejects_an_unwritable_out_before_any_work(tmp_path, capsys, work) -> None:
    bench_cli = pytest.importorskip("eupmu_bench.cli")
    blocker = a_file(tmp_path)
    usage_error(bench_cli.main, ["--device", "cpu", "--out", str(blocker / "bench")], capsys,
                "--out", "cannot create the directory")
    assert work == []


def test_bench_runs_with_the_repeats_it_was_given(tmp_path, capsys) -> None:
    bench_cli = pytest.importorskip("eupmu_bench.cli")
    out = tmp_path / "bench"
    rc = bench_cli.main(["--device", "cpu", "--sizes", "2e4", "--dtypes", "float32", "--methods", "adamw-fused",
                         "--backends", "torch", "--repeats", "2", "--warmup", "0", "--bandwidth-numel", "1e5",
                         "--threads", "1", "--no-plot", "--no-progress", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["adamw-fused"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    capsys.readouterr()


# ---------------------------------------------------------------------------------- a good eupmu-unlearn run


def test_unlearn_runs_two_methods_and_writes_its_json(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert unlearn_cli.main(["--methods", "eupmu,rl", "--no-plot", "--out", str(out), *TINY_RUN]) == 0
    record = json.loads((out / "digits_class.json").read_text())
    assert list(record["methods"]) == ["eupmu", "rl"]
    assert sorted(p.name for p in out.iterdir()) == ["digits_class.json"]  # no probe or partial file left
    capsys.readouterr()
    assert unlearn_cli.main(["table", str(out / "digits_class.json")]) == 0
    assert "(`rl`)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- cli_args itself


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path) -> None:
    path = tmp_path / "result.json"
    cli_args.write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with cli_args.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    cli_args.write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_output_dir_check_creates_the_folder_and_leaves_no_probe(tmp_path) -> None:
    parser = cli_args.Parser(prog="prog")
    target = tmp_path / "a" / "b"
    cli_args.check_output_dir(parser, "--out", target)
    assert target.is_dir() and list(target.iterdir()) == []


@pytest.mark.parametrize("text, value", [("1e6", 1_000_000), ("2.5e7", 25_000_000), ("12", 12)])
def test_count_reads_scientific_notation(text, value) -> None:
    assert cli_args.count(text) == value
