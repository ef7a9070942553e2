"""Argument checks and result writing shared by the command-line tools.

``eupmu-unlearn``, ``eupmu-unlearn-llm`` and ``eupmu-bench`` validate everything they are given
before doing any work: numbers against their ranges, comma-separated lists element by element
against their registries, and the output location by creating it and writing a probe file. A bad
argument ends the command with one line on stderr (``<prog>: error: argument --lr: must be > 0,
got -0.1``) and exit status 2, the argparse convention. Results are written atomically at the end
(a temporary sibling renamed onto the final name), so an interrupted run never leaves a half
written file behind.

The validators are argparse ``type=`` callables: they raise :class:`argparse.ArgumentTypeError`,
whose message argparse prefixes with the option's name.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn, Sequence, TypeVar

T = TypeVar("T")

SEED_MAX = 2**32 - 1  # numpy's and torch's seeding accept every value in [0, SEED_MAX]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``<prog>: error: <message>``, exit status 2.

    (argparse's own ``error`` prints the whole usage first, which for these tools buries the
    message under a screenful of options; ``--help`` still shows the usage.) Values such as
    ``-1e-5`` are read as negative numbers, not as options, so ``--lr -1e-5`` reaches the range
    check instead of failing with "expected one argument" (none of these tools has an option
    that looks like a number).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(parser: argparse.ArgumentParser, option: str, problem: str) -> NoReturn:
    """Report a problem with one option found after parsing, in argparse's wording."""
    parser.error(f"argument {option}: {problem}")


# ---------------------------------------------------------------------------------- numbers


def _number_text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_number_text(lo)}, {_number_text(hi)}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_number_text(lo)}"
    return f"<= {_number_text(hi)}"


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either bound may be left open)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi, False)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi], or in (lo, hi] with ``lo_open`` (either bound may be left open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi, lo_open)}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def count(text: str) -> int:
    """A whole number >= 1, also written like ``1e6`` or ``2.5e7``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number such as 1000 or 1e6, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number such as 1000 or 1e6, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return int(value)


seed = integer(0, SEED_MAX)
positive = real(0.0, lo_open=True)
non_negative = real(0.0)


# ---------------------------------------------------------------------------------- names and lists


def one_of(choices: Iterable[str], what: str = "value", aliases: Iterable[str] = ()) -> Callable[[str], str]:
    """A name from ``choices`` (the registry) or ``aliases``; the message lists the choices."""
    known = tuple(choices)
    accepted = set(known) | set(aliases)

    def parse(text: str) -> str:
        name = text.strip()
        if name not in accepted:
            raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        return name

    parse.__name__ = what
    return parse


def comma_list(item: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A comma-separated list, each element checked by ``item``; no empty or repeated elements."""

    def parse(text: str) -> tuple[T, ...]:
        parts = [part.strip() for part in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError("must not be empty")
        if not all(parts):
            raise argparse.ArgumentTypeError(f"has an empty element: {text!r}")
        values = tuple(item(part) for part in parts)
        repeated = sorted({parts[i] for i, v in enumerate(values) if values.index(v) != i})
        if repeated:
            raise argparse.ArgumentTypeError(f"repeats {', '.join(map(repr, repeated))} in {text!r}")
        return values

    parse.__name__ = "list"
    return parse


class _JoinLists(argparse.Action):
    """Joins the comma-separated lists of several words (``--sizes 1e6,1e7 2e7``) into one tuple."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001 (argparse API)
        setattr(namespace, self.dest, tuple(value for part in values for value in part))


def add_list_option(parser: argparse.ArgumentParser, flag: str, item: Callable[[str], T],
                    default: Sequence[T] | None, help: str) -> None:
    """A comma-separated list option; for older command lines, space-separated words are taken too."""
    parser.add_argument(flag, nargs="+", type=comma_list(item), action=_JoinLists,
                        default=None if default is None else tuple(default), help=help)


def check_distinct(parser: argparse.ArgumentParser, option: str, names: Sequence[str],
                   canonical: Callable[[str], object]) -> None:
    """No two of ``names`` stand for the same thing (an alias and its name, say)."""
    keys = [canonical(name) for name in names]
    twice = [name for name, key in zip(names, keys) if keys.count(key) > 1]
    if twice:
        fail(parser, option, f"{', '.join(twice)} name the same method twice")


def device(allow_auto: bool = False) -> Callable[[str], str]:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ...) that exists on this machine."""

    def parse(text: str) -> str:
        name = text.strip()
        if allow_auto and name == "auto":
            return name
        import torch

        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
            raise argparse.ArgumentTypeError(f"not a device: {name!r} (use {choices})") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{name!r} requested, but no CUDA device is available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{name!r} requested, but there are only "
                                                 f"{torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise argparse.ArgumentTypeError(f"unsupported device {name!r} (use cpu or cuda)")
        return name

    parse.__name__ = "device"
    return parse


# ---------------------------------------------------------------------------------- output locations


def _probe(folder: Path) -> str | None:
    """Write and remove a small file in ``folder``; the reason it failed, or None."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_output_dir(parser: argparse.ArgumentParser, option: str, path: Path) -> None:
    """``path`` is (now) a writable directory, or the command ends with one line naming ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(parser, option, f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(parser, option, f"cannot create the directory {path}: {err.strerror or err}")
    reason = _probe(path)
    if reason is not None:
        fail(parser, option, f"cannot write to the directory {path}: {reason}")


def check_output_file(parser: argparse.ArgumentParser, option: str, path: Path) -> None:
    """``path`` can be (over)written: its directory exists or is created and takes new files."""
    path = Path(path)
    if path.is_dir():
        fail(parser, option, f"{path} is a directory, expected a file")
    check_output_dir(parser, option, path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        fail(parser, option, f"cannot overwrite {path}: permission denied")


def check_directory_or_absent(parser: argparse.ArgumentParser, option: str, path: Path | None) -> None:
    """A cache folder may not exist yet (it is created when needed), but it may not be a file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        fail(parser, option, f"{path} exists and is not a directory")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same suffix) to write; renamed onto ``path`` when the block
    ends without an error (if the block wrote it), removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def display_path(path: Path | None) -> str | None:
    """A path for a result file that does not name this machine's layout: relative to the working
    folder when inside it, else under ``~/``, else the file name alone."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        try:
            return prefix + str(resolved.relative_to(base))
        except ValueError:
            continue
    return resolved.name
