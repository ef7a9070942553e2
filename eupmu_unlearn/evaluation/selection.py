"""The stored hyperparameter selection (``results/hparams.json``) and how runs pick from it.

Entries are keyed by ``"<dataset>/<scenario>/<architecture>"``; each holds, per method, the
learning rate and knob value the validation sweep chose. A run whose key is missing falls back
to the same dataset and architecture under the other scenario, then to the built-in defaults
of :data:`eupmu_kernels.evaluation.methods.METHODS`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..methods import Hyper, Method

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SELECTION_PATH = Path(__file__).resolve().parents[1] / "data" / "hparams.json"


def selection_key(dataset: str, scenario: str, architecture: str) -> str:
    return f"{dataset}/{scenario}/{architecture}"


def load_selection(path: Path | None) -> dict[str, Any]:
    """The selection file's contents, or an empty selection when there is none."""
    if path is None or not Path(path).is_file():
        return {"selections": {}}
    data = json.loads(Path(path).read_text())
    data.setdefault("selections", {})
    return data


def selection_problem(path: Path) -> str | None:
    """Why the file at ``path`` cannot serve as a selection file, or None (also when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        return f"{path} is a directory, expected a file" if path.is_dir() else f"{path} is not a file"
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is not a JSON file"
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    if not isinstance(data, dict) or not isinstance(data.get("selections"), dict):
        return f"{path} is not a hyperparameter selection (expected an object with 'selections')"
    return None


@dataclass(frozen=True)
class ChosenHyper:
    hyper: Hyper
    source: str  # where the values came from, for the record


def choose(spec: Method, selection: dict[str, Any], key: str, lr: float | None = None,
           tolerance: float | None = None) -> ChosenHyper:
    """Stored (or default) values for ``spec``, with the command-line overrides applied."""
    entry, source = _lookup(spec.name, selection, key)
    if entry is None:
        hyper, source = Hyper(*spec.default), "built-in default"
    else:
        hyper = Hyper(float(entry["lr"]), None if entry.get("knob") is None else float(entry["knob"]))
    overrides = []
    if lr is not None:
        hyper = Hyper(lr, hyper.knob)
        overrides.append("lr")
    if tolerance is not None and spec.knob == "tolerance":
        hyper = Hyper(hyper.lr, tolerance)
    elif tolerance is not None and spec.knob == "err":
        hyper = Hyper(hyper.lr, -tolerance)
    elif tolerance is not None and spec.takes_tolerance:
        hyper = Hyper(hyper.lr, hyper.knob, tolerance)
    if tolerance is not None and (spec.knob in ("tolerance", "err") or spec.takes_tolerance):
        overrides.append("tolerance")
    if overrides:
        source += f" (overridden: {', '.join(overrides)})"
    return ChosenHyper(hyper, source)


def _lookup(method: str, selection: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    dataset, scenario, architecture = key.split("/")
    other = "random" if scenario == "class" else "class"
    for candidate in (key, selection_key(dataset, other, architecture)):
        methods = selection["selections"].get(candidate, {}).get("methods", {})
        if method in methods:
            return methods[method], f"selection {candidate}"
    return None, ""


def store_entry(path: Path, key: str, entry: dict[str, Any], header: dict[str, Any]) -> None:
    """Write one key's sweep result into the selection file, keeping the other keys.

    Methods already stored under ``key`` and absent from ``entry`` are kept, so a sweep of some
    methods updates just those.
    """
    data = load_selection(path)
    data.update(header)
    previous = data["selections"].get(key, {}).get("methods", {})
    data["selections"][key] = {**entry, "methods": {**previous, **entry.get("methods", {})}}
    data["selections"] = dict(sorted(data["selections"].items()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
