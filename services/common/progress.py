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


def byte_bar(total: int, desc: str) -> tqdm:
    """A bar counting bytes (call .update(n)); silent off a terminal."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not on_terminal())


def request_bar(total: int, desc: str) -> tqdm:
    """A bar counting finished requests of a benchmark run; silent off a terminal."""
    return tqdm(total=total, unit="req", desc=desc, disable=not on_terminal(), leave=False)
