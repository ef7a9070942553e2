"""The build description of eupmu_kernels._C (csrc/build_ext_config.py): architecture flags, sources."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    spec = importlib.util.spec_from_file_location("build_ext_config", os.path.join(ROOT, "csrc", "build_ext_config.py"))
    module = importlib.util.module_from_spec(spec)
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
    sources = config._sources(ROOT)
    assert all(not os.path.isabs(s) for s in sources)
    names = {os.path.basename(s) for s in sources}
    assert {"bindings.cpp", "cpu_kernels.cpp", "cpu_ops.cpp", "cuda_ops.cpp", "cuda_kernels.cu"} <= names
    # one object file per source: ninja would overwrite clashing stems
    stems = [os.path.splitext(n)[0] for n in names]
    assert len(stems) == len(set(stems))
