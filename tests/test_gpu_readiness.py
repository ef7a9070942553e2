"""GPU readiness without a GPU (benchmarks/gpu_readiness.py): the kernels compile and look right.

One reduced run of the readiness tool (every Triton kernel with its widest flags and each storage
width, under the dev stack's Triton and under triton 3.6.0 when it is installed in a private
folder, plus every CUDA kernel through nvcc) for sm_80 and sm_90, then checks on its rows:
everything compiles, nothing spills at sm_90, the fast paths use 128-bit global accesses,
registers and occupancy are filled in. ``make gpu-readiness`` runs the full sweep.

triton 3.6.0 comes from ``EUPMU_TRITON36`` (set by ``make test``, which installs it under
``.venv/triton36``) or that default folder; without it the 3.6 checks skip, unless
``EUPMU_TRITON36`` names a folder that does not hold it (then they fail).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "benchmarks", "gpu_readiness.py")
# loaded from its file: putting benchmarks/ on sys.path would let its module names shadow others
_spec = importlib.util.spec_from_file_location("eupmu_gpu_readiness", TOOL)
readiness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = readiness  # dataclasses look their module up while the class is built
_spec.loader.exec_module(readiness)

EXPECTED_SPECIALIZATIONS = {"_gramian_blocks_kernel": 6, "_gramian_finish_kernel": 2, "_coefficients_kernel": 32,
                            "_advance_steps_kernel": 2, "_sgd_kernel": 16, "_adam_kernel": 30, "_combine_kernel": 6,
                            "_terms_blocks_kernel": 23, "_finish_rows_kernel": 1,
                            "_update_space_coefficients_kernel": 4}


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton36() -> str | None:
    configured = os.environ.get("EUPMU_TRITON36")
    folder = configured or os.path.join(REPO, ".venv", "triton36")
    if os.path.isdir(os.path.join(folder, "triton")):
        return folder
    if configured:
        pytest.fail(f"EUPMU_TRITON36={configured} holds no triton package (make test installs it there)")
    return None


def _nvcc() -> str | None:
    return readiness._find_nvcc()


def _compile_env(extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, REPO, env.get("PYTHONPATH")) if p)
    return env


pytestmark = pytest.mark.skipif(not _triton_installed(), reason="triton is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("readiness")
    cmd = [sys.executable, TOOL, "--out", str(out), "--quick", "--archs", "80", "90"]
    t36 = _triton36()
    if t36:
        cmd += ["--triton36", t36]
    if _nvcc() is None:
        cmd.append("--no-cuda")
    res = subprocess.run(cmd, env=_compile_env(), capture_output=True, text=True, timeout=900)
    path = out / "gpu_readiness.json"
    assert path.exists(), f"the readiness tool wrote no report (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    data = json.loads(path.read_text())
    data["_rc"], data["_log"] = res.returncode, res.stdout + res.stderr
    data["_md"] = (out / "gpu_readiness.md").read_text()
    return data


def _rows(report, **match) -> list[dict]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def _describe(r: dict) -> str:
    return f"{r['backend']} {r['kernel']} [{r['specialization']}] {r['arch']} {r['toolchain']}: {r.get('error')}"


# ---------------------------------------------------------------------------------------- enumeration


@pytest.mark.parametrize("stack", ["dev", "3.6"])
def test_the_recorded_launches_cover_every_flag(stack):
    """Driving the Triton backend over dtypes, rules and flags reaches every specialisation (122)."""
    path = None
    if stack == "3.6":
        path = _triton36()
        if path is None:
            pytest.skip("triton 3.6.0 is not installed in a private folder (make test installs it)")
    res = subprocess.run([sys.executable, TOOL, "--list"], env=_compile_env(path), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    if stack == "3.6":
        assert listing["triton"] == "3.6.0"
    counts: dict[str, int] = {}
    for item in listing["specializations"]:
        counts[item["kernel"]] = counts.get(item["kernel"], 0) + 1
    assert counts == EXPECTED_SPECIALIZATIONS
    assert len({(i["kernel"], i["specialization"]) for i in listing["specializations"]}) == 122


# ---------------------------------------------------------------------------------------- compile checks


def test_every_specialization_compiles(report):
    failed = [_describe(r) for r in report["rows"] if not r["compiled"]]
    assert not failed, "\n".join(failed[:20])
    assert report["_rc"] == 0, report["_log"][-3000:]
    toolchains = set(report["summary"]["toolchains"])
    import triton

    assert f"triton {triton.__version__}" in toolchains
    if _triton36():
        assert "triton 3.6.0" in toolchains
    for stack in toolchains - {t for t in toolchains if t.startswith("nvcc")}:
        for kernel in EXPECTED_SPECIALIZATIONS:
            for arch in ("sm_80", "sm_90"):
                assert _rows(report, backend="triton", toolchain=stack, kernel=kernel, arch=arch), (stack, kernel, arch)


def test_no_spills_at_sm90(report):
    rows = _rows(report, arch="sm_90")
    assert rows
    spilled = [f"{_describe(r)} spills {r['spills']} B" for r in rows if r["spills"] != 0]
    assert not spilled, "\n".join(spilled)


def test_fast_paths_use_128_bit_global_accesses(report):
    """The unmasked, 16-byte aligned path of every block kernel loads and stores 16 bytes at a time."""
    checked = [r for r in report["rows"] if r["expected_v4_loads"] is not None]
    kernels = {r["kernel"] for r in checked if r["backend"] == "triton"}
    assert kernels == {"_gramian_blocks_kernel", "_sgd_kernel", "_adam_kernel", "_combine_kernel",
                       "_terms_blocks_kernel"}
    narrow = [f"{_describe(r)} v4 ld/st {r['ld_global_v4']}/{r['st_global_v4']}, want >= "
              f"{r['expected_v4_loads']}/{r['expected_v4_stores']}" for r in checked if not r["vectorised"]]
    assert not narrow, "\n".join(narrow)


def test_registers_and_occupancy_are_reported(report):
    for r in report["rows"]:
        assert isinstance(r["registers"], int) and 0 < r["registers"] <= 255, _describe(r)
        assert r["spills"] is not None and r["shared_bytes"] is not None, _describe(r)
        if r["threads_per_block"]:
            assert 0 < r["occupancy"] <= 1 and r["blocks_per_sm"] >= 1, _describe(r)
    assert "occupancy" in report["_md"] and "a model, not a measurement" in report["_md"]


def test_cuda_kernels_compile_for_both_archs(report):
    if _nvcc() is None:
        pytest.skip("nvcc not found")
    for arch in ("sm_80", "sm_90"):
        rows = _rows(report, backend="cuda", arch=arch)
        kernels = {r["kernel"] for r in rows}
        assert {"gram_chunks_kernel", "gram_cleanup_kernel", "coefficients_kernel", "combine_chunks_kernel",
                "update_chunks_kernel", "advance_steps_kernel"} <= kernels, kernels
        assert len(rows) >= 40  # every template instantiation of the launchers


def test_cuda_kernels_read_their_launch_arguments_in_place(report):
    """The tensor lists travel by value in the kernel arguments (csrc/launch_plan.h): no kernel
    copies them to a stack frame or spills, at either arch."""
    if _nvcc() is None:
        pytest.skip("nvcc not found")
    rows = _rows(report, backend="cuda")
    assert rows
    framed = [f"{_describe(r)}: {r['stack_bytes']} B stack, {r['spills']} B spilled" for r in rows
              if r["stack_bytes"] or r["spills"]]
    assert not framed, "\n".join(framed)


def test_bytes_model_projection_is_labelled(report):
    projection = report["bytes_model_projection"]
    two_pass = [p for p in projection if p["kernel"].startswith("explicit surgery") and p["layout"] == "fp32"]
    assert two_pass and two_pass[0]["bytes_per_param"] == 40  # the bytes model: 8 (Gramian) + 32 (step)
    assert two_pass[0]["model_us_H100"] == pytest.approx(40 * 1e8 / 3.35e12 * 1e6)


# ---------------------------------------------------------------------------------------- triton 3.6 interpreter


def test_triton_kernel_tests_pass_under_the_triton36_interpreter():
    path = _triton36()
    if path is None:
        pytest.skip("triton 3.6.0 is not installed in a private folder (make test installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in (path, REPO) if p))
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True)
    assert version.stdout.strip() == "3.6.0", version.stdout + version.stderr
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          os.path.join(REPO, "tests", "test_triton_kernels.py"), "-k",
                          "gramian or range or tiny or huge or beyond or coefficients or combine or skip"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


# ---------------------------------------------------------------------------------------- parsers


def test_ptxas_log_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 8 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""
    parsed = readiness.parse_ptxas_log(log)
    assert parsed["k1"] == {"registers": 48, "spill_stores": 8, "spill_loads": 12, "stack_bytes": 16, "smem": 8}
    assert parsed["k2"]["registers"] == 255 and parsed["k2"]["spill_stores"] == 0


def test_v4_counter_and_occupancy():
    ptx = ("ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n ld.global.nc.v4.f32 {..}, [%rd2];\n"
           "@%p1 st.global.v4.b32 [%rd3], {..};\n ld.shared.v4.b32 {..}, [%r5];\n ld.v4.u32 {..}, [%rd6];\n"
           "ld.global.b32 %r7, [%rd7];\n st.v4.f32 [%rd8], {..};")
    assert readiness.count_v4(ptx) == (2, 1)
    assert readiness.count_v4(ptx, global_only=False) == (3, 2)
    # 256 threads at 128 registers: 65536 / (128 * 32) = 16 warps = 2 blocks of 8 warps, 16 of 64 warps
    blocks, occ, limiter = readiness.occupancy(90, 128, 256, 0)
    assert (blocks, occ, limiter) == (2, 0.25, "registers")
    assert readiness.occupancy(90, 32, 256, 0)[:2] == (8, 1.0)
    assert readiness.occupancy(80, 32, 1024, 100 * 1024)[2] == "shared memory"
