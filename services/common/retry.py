"""Bounded retries for transient I/O errors: exponential backoff with jitter, under a time budget.

Fatal errors (bad input, wrong types, programming errors) are never retried: the caller's
`is_transient` decides. When the budget is spent the last transient error is raised as is.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
OUTAGE_MAX_S = 10.0  # longest wait between tries while waiting out an outage (no time budget)


class Backoff:
    """Delays of base, 2*base, 4*base ... capped at `max_s`, each jittered to 50-100 %, until
    `budget_s` seconds have passed since construction."""

    def __init__(self, budget_s: float, base_s: float = 0.05, max_s: float = 2.0) -> None:
        self.deadline = time.monotonic() + budget_s
        self.base_s = base_s
        self.max_s = max_s
        self.failures = 0

    async def sleep(self) -> bool:
        """Wait before the next try; False (without waiting) when the budget is spent."""
        self.failures += 1
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        delay = min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        await asyncio.sleep(min(left, delay * random.uniform(0.5, 1.0)))
        return True

    def reset(self) -> None:
        """After a success: the next failure starts from the shortest delay again."""
        self.failures = 0


def outage_backoff() -> Backoff:
    """For waiting out a server the service cannot work without: no time budget, 0.5 s doubling
    to OUTAGE_MAX_S between tries."""
    return Backoff(float("inf"), base_s=0.5, max_s=OUTAGE_MAX_S)


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    is_transient: Callable[[BaseException], bool],
    budget_s: float,
    log: Any,
    what: str,
) -> T:
    """Run `operation` until it succeeds, a non-transient error escapes, or `budget_s` is spent."""
    backoff = Backoff(budget_s)
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if not await backoff.sleep():
                log.error("transient error persisted, giving up", what=what,
                          attempts=backoff.failures, error=repr(exc))
                raise
            log.warning("transient error, retrying", what=what, attempt=backoff.failures,
                        error=repr(exc))
