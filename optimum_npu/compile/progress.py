"""Progress of compiles: tqdm bars on a terminal, one line per compile otherwise.

A bar redraws itself in place, which only a terminal (or a notebook) shows as a bar: in a log file,
a CI log or a pipe every redraw and its escape codes pile up, and a model's graphs nest the bars
of their compiler passes. There, each finished compile writes one line to stderr instead (the
outermost one: a model's, or a lone `compile_from_torch`'s), and nested progress writes nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_open = 0   # compiles in progress in this thread of work (nesting depth), for the plain-line form


def _shows_bars() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def track(items: Iterable[T], desc: str, unit: str, label: Callable[[T], str] | None = None,
          leave: bool = True) -> Iterator[T]:
    """Iterate `items`, showing progress as `desc`; `label(item)` names the current item on a bar."""
    global _open
    items = list(items)
    if _shows_bars():
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc=desc, unit=unit, delay=1.0, leave=leave) as bar:
            for item in items:
                if label is not None:
                    bar.set_postfix_str(label(item), refresh=False)
                yield item
                bar.update()
        return
    _open += 1
    started = time.perf_counter()
    try:
        for item in items:
            yield item
    finally:
        _open -= 1
    if _open == 0:   # reached only when every item was done (an error closes the generator above)
        plural = "" if len(items) == 1 else "es" if unit.endswith("s") else "s"
        print(f"{desc}: {len(items)} {unit}{plural} in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def nested() -> Iterator[None]:
    """Compiles inside the block are part of an enclosing one (e.g. a model's memory probe before
    its graphs): on a plain stream they write no line of their own."""
    global _open
    _open += 1
    try:
        yield
    finally:
        _open -= 1
