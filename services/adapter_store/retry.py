"""Bounded retries with exponential backoff and full jitter for transient I/O failures."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries, first one included
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay_s(self, failed_attempts: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(n-1))] after the n-th failure."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (failed_attempts - 1)))
        return random.uniform(0.0, cap)


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    log: Any,  # a structlog bound logger
    what: str,
) -> T:
    """Run `operation`; on a transient failure wait and try again, up to `policy.attempts` tries.

    The last transient failure is re-raised as is; a non-transient one is raised at once.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts:
                raise
            delay = policy.delay_s(attempt)
            log.warning("transient error retrying", what=what, attempt=attempt, delay_s=round(delay, 3), error=str(exc)[:300])
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop always returns or raises
