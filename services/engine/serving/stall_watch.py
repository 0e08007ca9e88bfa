"""How long the engine's current step has run: the liveness heartbeat (health.py) is withheld
while one step runs past its stall limit (a GPU hang, a collective waiting for a dead rank)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class StallWatch:
    """When the work a service runs off its event loop (an engine step) started, if it still runs.

    started() / finished() are called from the worker thread around each unit of work; problem()
    from the event loop (plain attribute reads). clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_s, self._clock = stall_s, clock
        self._since: float | None = None

    def started(self) -> None:
        self._since = self._clock()

    def finished(self) -> None:
        self._since = None

    def timed(self, work: Callable[[], Any]) -> Any:
        """work() between started() and finished() (run in the worker thread)."""
        self.started()
        try:
            return work()
        finally:
            self.finished()

    def problem(self) -> str | None:
        since = self._since
        if since is None or self._clock() - since <= self.stall_s:
            return None
        return (f"one engine step has run for {self._clock() - since:.0f}s (limit {self.stall_s:.0f}s): "
                "stuck on the GPU or in a collective")
