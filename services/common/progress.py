"""Progress bars for long work (weight loading, CUDA graph capture, adapter pushes, benchmarks):
tqdm on stderr when it is a terminal, nothing otherwise (services under Kubernetes, CI, tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on a terminal."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=not on_terminal(), leave=False))


def counter_bar(total: int, desc: str, unit: str) -> tqdm:
    """A bar the caller advances (.update(n)), of bytes (unit "B", scaled) or of anything else;
    silent off a terminal."""
    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, disable=not on_terminal(),
                leave=unit == "B")
