"""``eupmu-bench --rounds``: every case runs once per round, in a rotated order, samples pooled."""

from __future__ import annotations

import json
import statistics

from eupmu_bench import cli, runner


def test_rounds_pool_every_sample_and_rotate_the_order(tmp_path, monkeypatch) -> None:
    order: list[str] = []
    real_run_case = runner.run_case

    def recording_run_case(case, wl, config, probe):
        order.append(case.method.name)
        return real_run_case(case, wl, config, probe)

    monkeypatch.setattr(runner, "run_case", recording_run_case)
    out = tmp_path / "bench"
    argv = ["--sizes", "2e4", "--dtypes", "float32", "--methods", "adamw-fused,eupmu-implicit,eupmu-explicit",
            "--backends", "torch", "--repeats", "3", "--rounds", "3", "--warmup", "1", "--no-plot",
            "--no-progress", "--bandwidth-numel", "100000", "--out", str(out)]
    assert cli.main(argv) == 0
    names = ["adamw-fused", "eupmu-implicit", "eupmu-explicit"]
    assert order == names + names[1:] + names[:1] + names[2:] + names[:2]
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == names  # reported in the requested order, once each
    for r in records:
        assert len(r["samples_ms"]) == 9 and len(r["round_medians_ms"]) == 3
        assert r["median_ms"] == statistics.median(r["samples_ms"])
        assert r["min_ms"] == min(r["samples_ms"])


def test_one_round_is_the_default() -> None:
    config = cli.make_config(cli.build_parser().parse_args(["--sizes", "2e4"]))
    assert config.rounds == 1
