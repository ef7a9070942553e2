"""The package layout: the optimizer imports no application, and an installed wheel runs the
benchmark with the same tuned hyperparameters as the checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eupmu_unlearn import cli
from eupmu_unlearn.evaluation.runner import DEFAULT_METHODS

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"eupmu_kernels": REPO / "eupmu_kernels", "eupmu_unlearn": REPO / "eupmu_unlearn",
                "eupmu_bench": REPO / "benchmarks" / "eupmu_bench"}
# What the applications need and the optimizer must not pull in.
APPLICATION_MODULES = ("tqdm", "matplotlib", "sklearn", "scipy", "transformers", "accelerate", "mnist1d", "gguf",
                       "eupmu_unlearn", "eupmu_bench")
SOURCES = ("setup.py", "pyproject.toml", "README.md", "eupmu_kernels", "eupmu_unlearn", "benchmarks")


def python(code: str, *args: str, pythonpath: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def checkout_path() -> str:
    return os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])


def test_importing_the_optimizer_imports_no_application() -> None:
    code = ("import json, sys\n"
            "import torch\n"
            "before = set(sys.modules)\n"
            "import eupmu_kernels, eupmu_kernels.ops\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    added = json.loads(python(code, pythonpath=checkout_path()))
    pulled = [m for m in added if m.split(".")[0] in APPLICATION_MODULES]
    assert pulled == [], f"import eupmu_kernels imported {pulled}"


def module_names() -> list[str]:
    """Every Python module of the three packages in the checkout (the compiled extension aside)."""
    names = []
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            names.append(".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return sorted(names)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """A wheel built with the extension disabled from a copy of the sources, installed into a folder."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build", "*.egg-info", "results")
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=junk)
        else:
            shutil.copy2(origin, source / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source), cwd=work)
    (built,) = (work / "dist").glob("*.whl")
    pip("install", "--no-deps", "--target", str(work / "site"), str(built), cwd=work)
    return built, work / "site"


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, env={**os.environ, "EUPMU_BUILD_EXT": "0"}, cwd=cwd,
                          timeout=600)
    assert done.returncode == 0, done.stderr


def test_the_wheel_carries_the_tuned_selection(wheel) -> None:
    built, _ = wheel
    with zipfile.ZipFile(built) as archive:
        shipped = archive.read("eupmu_unlearn/data/hparams.json")
    assert shipped == (REPO / "eupmu_unlearn" / "data" / "hparams.json").read_bytes()


def test_the_wheel_holds_every_module_of_the_checkout(wheel, tmp_path) -> None:
    _, site = wheel
    code = ("import importlib.util, json, sys\n"
            "print(json.dumps({n: importlib.util.find_spec(n).origin for n in json.loads(sys.argv[1])}))\n")
    origins = json.loads(python(code, json.dumps(module_names()), pythonpath=str(site), cwd=tmp_path))
    elsewhere = {name: origin for name, origin in origins.items() if not origin.startswith(str(site))}
    assert elsewhere == {}


def test_eupmu_unlearn_from_the_wheel_uses_the_same_hyperparameters_as_the_checkout(wheel, tmp_path, capsys) -> None:
    _, site = wheel
    argv = ["--dry-run", "--methods", ",".join(DEFAULT_METHODS)]
    assert cli.main(argv) == 0
    checkout = json.loads(capsys.readouterr().out)["methods"]
    done = subprocess.run([str(site / "bin" / "eupmu-unlearn"), *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)["methods"]
    assert installed == checkout
    assert all(row["hyper_source"].startswith("package selection ") for row in installed.values())
