"""The tuned hyperparameters and how runs pick from them.

The selection the project tuned ships inside the package (``eupmu_unlearn/data/hparams.json``,
read with ``importlib.resources``), so a checkout and an installed wheel run with the same
values. ``eupmu-unlearn sweep`` writes a user's own selection (by default
``runs/eupmu-unlearn/hparams.json``), which ``eupmu-unlearn run --selection PATH`` reads in front
of the packaged one.

Entries are keyed by ``"<dataset>/<scenario>/<architecture>"``; each holds, per method, the
learning rate and knob value the validation sweep chose. A method is looked up under the run's
key, then under the same dataset and architecture with the other scenario (in the user's file
first, then in the package's), then the built-in defaults of :data:`eupmu_unlearn.methods.METHODS`
apply. The run records where each method's values came from (``hyper_source``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..cli_args import write_text_atomic
from ..methods import Hyper, Method

PACKAGE_SOURCE = "package selection"
DEFAULT_SWEEP_PATH = Path("runs") / "eupmu-unlearn" / "hparams.json"
BUILT_IN = "built-in default"


def selection_key(dataset: str, scenario: str, architecture: str) -> str:
    return f"{dataset}/{scenario}/{architecture}"


def package_selection() -> dict[str, Any]:
    """The selection shipped with the package."""
    return json.loads(resources.files("eupmu_unlearn").joinpath("data", "hparams.json").read_text())


def load_selection(path: Path) -> dict[str, Any]:
    """A selection file's contents, or an empty selection when there is none yet."""
    if not Path(path).is_file():
        return {"selections": {}}
    data = json.loads(Path(path).read_text())
    data.setdefault("selections", {})
    return data


@dataclass(frozen=True)
class Selections:
    """Selections to look methods up in, first match wins: ``(source name, contents)`` pairs."""

    sources: tuple[tuple[str, dict[str, Any]], ...]

    @classmethod
    def for_run(cls, user_path: Path | None, user_name: str | None = None) -> "Selections":
        """The user's file (named ``user_name`` in the record) in front of the package's."""
        package = (PACKAGE_SOURCE, package_selection())
        if user_path is None:
            return cls((package,))
        return cls(((f"selection file {user_name or Path(user_path).name}", load_selection(user_path)), package))

    def lookup(self, method: str, key: str) -> tuple[dict[str, Any] | None, str]:
        dataset, scenario, architecture = key.split("/")
        other = "random" if scenario == "class" else "class"
        for candidate in (key, selection_key(dataset, other, architecture)):
            for source, data in self.sources:
                methods = data["selections"].get(candidate, {}).get("methods", {})
                if method in methods:
                    return methods[method], f"{source} {candidate}"
        return None, BUILT_IN


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


def choose(method: Method, selections: Selections, key: str, lr: float | None = None,
           tolerance: float | None = None) -> ChosenHyper:
    """Stored (or default) values for ``method``, with the command-line overrides applied."""
    entry, source = selections.lookup(method.name, key)
    if entry is None:
        hyper = Hyper(*method.default)
    else:
        hyper = Hyper(float(entry["lr"]), None if entry.get("knob") is None else float(entry["knob"]))
    overrides = []
    if lr is not None:
        hyper = Hyper(lr, hyper.knob)
        overrides.append("lr")
    if tolerance is not None and method.knob == "tolerance":
        hyper = Hyper(hyper.lr, tolerance)
    elif tolerance is not None and method.knob == "err":
        hyper = Hyper(hyper.lr, -tolerance)
    elif tolerance is not None and method.takes_tolerance:
        hyper = Hyper(hyper.lr, hyper.knob, tolerance)
    if tolerance is not None and (method.knob in ("tolerance", "err") or method.takes_tolerance):
        overrides.append("tolerance")
    if overrides:
        source += f" (overridden: {', '.join(overrides)})"
    return ChosenHyper(hyper, source)


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), json.dumps(data, indent=1) + "\n")
