"""The build description of eupmu_kernels._C (csrc/build_ext_config.py): which parts are built,
architecture flags, sources, and the generated contract header."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    spec = importlib.util.spec_from_file_location("build_ext_config", os.path.join(ROOT, "csrc", "build_ext_config.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_default_archs_are_sm80_and_sm90_with_ptx_for_the_newest(config):
    assert config.gencode_flags(config.DEFAULT_ARCHS) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


@pytest.mark.parametrize("spec,expected", [
    ("9.0", [("90", False)]),
    ("8.0, 9.0a", [("80", False), ("90a", False)]),
    ("8.0+PTX;9.0", [("80", True), ("90", False)]),
    (" 10.0 ", [("100", False)]),
])
def test_arch_list_parsing(config, spec, expected):
    assert config.parse_archs(spec) == expected


def test_ptx_is_embedded_where_asked(config):
    flags = config.gencode_flags("8.0+PTX;9.0")
    assert "-gencode=arch=compute_80,code=compute_80" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags


@pytest.mark.parametrize("spec", ["sm_90", "9", "", "9.0;x"])
def test_bad_arch_lists_are_rejected(config, spec):
    with pytest.raises(ValueError, match="EUPMU_CUDA_ARCHS"):
        config.parse_archs(spec)


def test_sources_are_relative_and_complete(config):
    cuda = config.sources(ROOT, cuda=True)
    cpu = config.sources(ROOT, cuda=False)
    assert all(not os.path.isabs(s) for s in cuda)
    names = {os.path.basename(s) for s in cuda}
    assert {"bindings.cpp", "cpu_kernels.cpp", "cpu_ops.cpp", "cuda_ops.cpp", "cuda_kernels.cu"} <= names
    # one object file per source: ninja would overwrite clashing stems
    stems = [os.path.splitext(n)[0] for n in names]
    assert len(stems) == len(set(stems))
    # the C++ CPU build takes every source but the CUDA ones
    cpu_names = {n for n in names if not n.startswith("cuda_") and not n.endswith(".cu")}
    assert {os.path.basename(s) for s in cpu} == cpu_names
    assert "cpu_ops.cpp" in {os.path.basename(s) for s in cpu}


def tools(config, torch_version="2.13.0", torch_cuda=None, cxx="/usr/bin/c++", cuda_home=None):
    return config.Toolchain(torch_version, torch_cuda, cxx, cuda_home)


@pytest.mark.parametrize("ext,cuda,have,expected", [
    # (EUPMU_BUILD_EXT, EUPMU_BUILD_CUDA, toolchain, (extension, cuda) or "error")
    ("auto", "auto", dict(), (True, False)),  # CPU-only torch: the C++ CPU kernels
    ("auto", "auto", dict(torch_cuda="13.0"), (True, False)),  # CUDA torch, no nvcc
    ("auto", "auto", dict(torch_cuda="13.0", cuda_home="/cuda"), (True, True)),
    ("auto", "auto", dict(cuda_home="/cuda"), (True, False)),  # nvcc, but a CPU-only torch
    ("auto", "auto", dict(cxx=None), (False, False)),  # no compiler: skipped
    ("auto", "auto", dict(torch_version=None), (False, False)),  # no torch: skipped
    ("1", "auto", dict(cxx=None), "error"),
    ("1", "auto", dict(), (True, False)),
    ("auto", "0", dict(torch_cuda="13.0", cuda_home="/cuda"), (True, False)),
    ("auto", "1", dict(torch_cuda="13.0", cuda_home="/cuda"), (True, True)),
    ("auto", "1", dict(), "error"),  # CUDA kernels asked for, CPU-only torch
    ("auto", "1", dict(torch_cuda="13.0"), "error"),  # ... no nvcc
    ("auto", "1", dict(cxx=None, torch_cuda="13.0", cuda_home="/cuda"), "error"),
    ("0", "auto", dict(torch_cuda="13.0", cuda_home="/cuda"), (False, False)),
    ("0", "0", dict(), (False, False)),
    ("0", "1", dict(torch_cuda="13.0", cuda_home="/cuda"), "error"),  # contradiction
])
def test_build_plan(config, ext, cuda, have, expected):
    plan = config.plan_build(ext, cuda, tools(config, **have))
    if expected == "error":
        assert plan.error and not plan.extension
    else:
        assert plan.error is None and (plan.extension, plan.cuda) == expected
        assert plan.notes or plan.cuda  # a part left out is always explained


def test_build_modes_are_checked(config):
    assert config.read_mode("EUPMU_BUILD_EXT", {}) == "auto"
    assert config.read_mode("EUPMU_BUILD_CUDA", {"EUPMU_BUILD_CUDA": " 1 "}) == "1"
    with pytest.raises(ValueError, match="EUPMU_BUILD_EXT must be auto, 0 or 1"):
        config.read_mode("EUPMU_BUILD_EXT", {"EUPMU_BUILD_EXT": "yes"})


def test_contract_header_is_generated_from_the_registries(config, tmp_path):
    from eupmu_kernels import contract

    folder = config.write_contract_header(ROOT, str(tmp_path / "generated"))
    path = os.path.join(folder, config.CONTRACT_HEADER)
    text = open(path).read()
    assert text == contract.c_header()
    assert "enum Method : int { kMethodUngrad = 0," in text and "kRuleAdamw = 2" in text
    before = os.stat(path).st_mtime_ns
    config.write_contract_header(ROOT, folder)  # unchanged: not rewritten (nothing rebuilds)
    assert os.stat(path).st_mtime_ns == before
    assert config.generated_include_dir(ROOT) == os.path.join(ROOT, "build", "eupmu_generated")


def test_no_copy_of_the_generated_header_in_the_source_tree(config):
    """The header exists only where the build writes it, so no stale copy can shadow it: a copy
    in csrc/ would win over the build folder (quoted includes search the includer's folder first)."""
    for folder in ("csrc", "eupmu_kernels", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            assert config.CONTRACT_HEADER not in files, dirpath
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        assert not [t for t in tracked if t.endswith(config.CONTRACT_HEADER)]
    math_h = open(os.path.join(ROOT, "csrc", "eupmu_math.h")).read()
    assert '#include "eupmu_contract.h"' in math_h
    for name in ("kCoefLen =", "kClipEps =", "enum Method", "enum Rule", "kMethodUngrad =", "kRuleSgd ="):
        for source in os.listdir(os.path.join(ROOT, "csrc")):
            assert name not in open(os.path.join(ROOT, "csrc", source), errors="replace").read(), (name, source)
