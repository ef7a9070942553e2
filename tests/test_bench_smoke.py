"""Smoke tests of the benchmark package (eupmu_bench) at a tiny size, so its code cannot rot.

Every method, the ``eupmu-bench`` CLI (table, JSON, markdown, PNG), the profiler script, the
kernel micro-benchmarks and the GPU suite's shell syntax. Nothing here measures speed; the
checks are about what is benchmarked: all surgery methods compute the same step, and the
memory accounting sees what each method really holds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from eupmu_bench import cli, profile_step
from eupmu_bench.baselines import Settings
from eupmu_bench.methods import METHODS
from eupmu_bench.runner import BACKEND_NAMES, usable_backends
from eupmu_bench.workloads import FAMILIES, count, make_workload, scaled_shapes

TINY = 20_000
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def _load_kernel_benchmarks():
    """benchmarks/bench_kernels.py (a pytest-benchmark file, not a package module), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "benchmarks" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_kernels = _load_kernel_benchmarks()
# Methods that must produce the same parameters after one step from the same workload.
SAME_STEP = [
    ("adamw-fused", "eupmu-implicit", "eupmu-implicit-noguard"),
    ("naive", "composed", "composed-compiled", "eupmu-explicit", "eupmu-explicit-instep"),
    ("naive-clip", "naive-clip-fused", "eupmu-explicit-clip"),
    ("eupmu-explicit-update",),  # its own step; compared with the torch backend's below
]


def cpu_backends(dtype: torch.dtype = torch.float32) -> list[str]:
    return usable_backends(BACKEND_NAMES, CPU, dtype, allow_interpreter=False)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("numel", [30_000, 10**6, 10**9])
def test_scaled_shapes_land_within_one_embedding_row(family: str, numel: int) -> None:
    shapes = scaled_shapes(FAMILIES[family], numel)
    vocab, hidden = shapes[0]
    assert numel - FAMILIES[family].embedding_matrices * hidden < count(shapes) <= numel
    assert vocab >= 1


def one_step(method: str, wl, backend: str | None) -> torch.Tensor:
    prepared = METHODS[method].prepare(wl, backend, Settings())
    if prepared.before:
        prepared.before()
    prepared.step()
    return torch.cat([p.detach().reshape(-1) for p in prepared.params])


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_method_takes_the_step_of_its_group(backend: str) -> None:
    wl = make_workload("gpt2", TINY, torch.float32, CPU)
    after = {}
    for group in SAME_STEP:
        for method in group:
            after[method] = one_step(method, wl, backend if METHODS[method].per_backend else None)
            torch.testing.assert_close(after[method], after[group[0]], rtol=0, atol=1e-6, msg=method)
    surgery_moved = (after["eupmu-explicit"] - after["adamw-fused"]).abs().max()
    assert surgery_moved > 1e-4  # g_r conflicts with g_f, so the surgery changes the step
    assert set(after) == set(METHODS)
    # update space: every backend takes the torch backend's step (the same lambda up to float32 rounding)
    torch.testing.assert_close(after["eupmu-explicit-update"], one_step("eupmu-explicit-update", wl, "torch"),
                               rtol=0, atol=1e-6)
    assert (after["eupmu-explicit-update"] - after["eupmu-explicit"]).abs().max() > 0  # a different constraint


def test_cli_writes_json_markdown_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # bf16 here; fp32 runs every method in the test above.
    out = tmp_path / "bench"
    rc = cli.main(["--device", "cpu", "--sizes", "2e4", "--dtypes", "bfloat16", "--repeats", "1", "--warmup", "1",
                   "--bandwidth-numel", "1e5", "--no-progress", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    backends = cpu_backends(torch.bfloat16)
    assert len(records) == sum(len(backends) if m.per_backend else 1 for m in METHODS.values())
    assert all(r["dtype"] == "bfloat16" and r["median_ms"] > 0 and r["gbps"] > 0 for r in records)
    assert {s["backend"] for s in results["skipped"]} == set(BACKEND_NAMES) - set(backends)
    assert results["targets"]
    assert (out / "step_time.png").stat().st_size > 0
    assert "| eupmu-explicit " in (out / "results.md").read_text()
    assert "naive-clip-fused" in capsys.readouterr().out
    check_memory_accounting({(r["method"], r["backend"]): r for r in records})


def check_memory_accounting(records: dict[tuple[str, str], dict]) -> None:
    """Held and peak memory, in units of one gradient, match what each method allocates."""
    assert records["adamw-fused", "torch"]["held_grads"] == pytest.approx(2.0, abs=0.1)  # exp_avg, exp_avg_sq
    # the backward passes before each step leave fresh g_f (.grad) and g_r (kept by reference), plus the
    # two moments; AdamW's count excludes its g_f, which the harness installs as .grad
    assert records["eupmu-explicit", "torch"]["held_grads"] == pytest.approx(4.0, abs=0.15)
    assert records["naive", "torch"]["peak_tensor_grads"] >= 3.0  # flat copies, temporaries, new .grad
    assert records["adamw-fused", "torch"]["peak_tensor_grads"] < 0.1


def test_iteration_mode_times_whole_iterations(tmp_path: Path) -> None:
    out = tmp_path / "iteration"
    rc = cli.main(["iteration", "--size", "3e5", "--seq", "8", "--rounds", "1", "--iterations", "1", "--warmup", "1",
                   "--methods", "graddiff,composed,eupmu-explicit,eupmu-explicit-views,eupmu-implicit",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "iteration.json").read_text())
    records = {r["method"]: r for r in result["records"]}
    assert set(records) == {"graddiff", "composed", "eupmu-explicit", "eupmu-explicit-views", "eupmu-implicit"}
    assert records["graddiff"]["price_over_graddiff_steps"] == 0.0
    assert all(r["iteration_ms"] > r["step_ms"] > 0 and r["peak_tensor_mib"] > 0 for r in records.values())
    assert "| eupmu-explicit " in (out / "iteration.md").read_text()


def test_a_failing_case_is_reported_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(METHODS, "composed", dataclasses.replace(METHODS["composed"], prepare=broken))
    rc = cli.main(["--device", "cpu", "--sizes", "2e4", "--dtypes", "float32", "--repeats", "1", "--warmup", "0",
                   "--methods", "composed", "adamw-fused", "--bandwidth-numel", "1e5", "--no-progress", "--no-plot",
                   "--out", str(tmp_path)])
    assert rc == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["adamw-fused"]
    assert any("kernel exploded" in s["reason"] for s in results["skipped"])


def test_profile_script_writes_trace_and_tables(tmp_path: Path) -> None:
    rc = profile_step.main(["--numel", "2e4", "--steps", "1", "--device", "cpu",
                            "--methods", "naive", "eupmu-explicit", "--out", str(tmp_path)])
    assert rc == 0
    trace = json.loads((tmp_path / "trace_naive.json").read_text())
    assert trace["traceEvents"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| naive " in summary and "| eupmu-explicit " in summary
    assert "aten::cat" in {event.get("name") for event in trace["traceEvents"]}
    assert "Self CPU" in (tmp_path / "ops_naive.txt").read_text()


def test_kernel_benchmarks_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_kernels, "NUMEL", TINY)
    bench_kernels.workload.cache_clear()

    def run_once(fn):
        return fn()

    try:
        for backend in cpu_backends():
            for kernel in (bench_kernels.test_gramian, bench_kernels.test_coefficients, bench_kernels.test_combine,
                           bench_kernels.test_step_explicit_adamw, bench_kernels.test_step_implicit_adamw):
                kernel(run_once, backend, torch.float32)
        bench_kernels.test_update_terms(run_once, "torch", torch.float32)
        bench_kernels.test_torch_fused_adamw(run_once, torch.float32)
    finally:
        bench_kernels.workload.cache_clear()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_violations_table_counts_gradient_space_violations_and_none_in_update_space(tmp_path: Path) -> None:
    rc = cli.main(["violations", "--steps", "3", "--backends", "torch", "--dtypes", "float32", "--rules",
                   "sgd-momentum,adamw", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "violations.json").read_text())["records"]
    by_space = {(r["rule"], r["space"]): r["violations"] for r in records}
    assert by_space[("sgd-momentum", "update")] == 0 and by_space[("adamw", "update")] == 0
    assert by_space[("adamw", "gradient")] > 0  # what update space is for: Adam's moments raise L_r
    assert "| adamw | update | torch | float32 | 3 | 0 |" in (tmp_path / "violations.md").read_text()
