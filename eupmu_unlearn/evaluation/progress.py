"""A tqdm progress bar driven by "a unit of work starts: <message>" callbacks."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yields a callback; each call marks the previous unit done and names the one starting."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, disable=not enabled, unit="run", dynamic_ncols=True) as bar:
        started = 0

        def start(message: str) -> None:
            nonlocal started
            if started:
                bar.update(1)
            started += 1
            bar.set_postfix_str(message, refresh=True)

        yield start
        if started:
            bar.update(1)
