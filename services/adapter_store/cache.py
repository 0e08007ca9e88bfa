"""The store's core: a byte-budgeted LRU of validated adapters, single-flight loading, and a
short-lived negative cache of fatal failures.

    get(id) --hit--> value (moved to the LRU's young end)
       |--negative hit (within TTL)--> raise the remembered AdapterNotFound / InvalidAdapter
       |--load in flight--> await that same load (one storage read for any number of callers)
       '--miss--> start load(id) as a task; on success admit (evicting old entries past the
                  budget); on a fatal failure remember it for negative_ttl_s; a transient
                  failure (AdapterStoreUnavailable) is neither remembered nor retried here.

Generic over the value so the in-process store keeps LoraWeights and the node's store process
keeps canonical files in shared memory (one copy in host memory, not two). Every operation is
O(1) (OrderedDicts), so budgets of tens of thousands of small adapters are fine. Single-threaded
by design: call it from one event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

import structlog

from .errors import AdapterNotFoundError, InvalidAdapterError

V = TypeVar("V")
FATAL_ERRORS = (AdapterNotFoundError, InvalidAdapterError)


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int


@dataclass(frozen=True)
class _Failure:
    expires_at: float
    error_type: type[Exception]
    message: str


class LoadingLRU(Generic[V]):
    def __init__(
        self,
        load: Callable[[str], Awaitable[tuple[V, int]]],
        *,
        budget_bytes: int,
        negative_ttl_s: float,
        on_evict: Callable[[str, V], None] | None = None,
        negative_max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget_bytes < 0 or negative_ttl_s < 0 or negative_max_entries < 0:
            raise ValueError("budget_bytes, negative_ttl_s and negative_max_entries must be >= 0")
        self._load = load  # id -> (value, bytes it holds in host memory)
        self.budget_bytes = budget_bytes
        self.negative_ttl_s = negative_ttl_s
        self._on_evict = on_evict
        self._negative_max = negative_max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()  # oldest use first
        # NOTE: the TTL is the same for every failure, so insertion order is expiry order and
        # expired failures are always at the front.
        self._failures: OrderedDict[str, _Failure] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[V]] = {}
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    @property
    def loading(self) -> int:
        """Loads in flight."""
        return len(self._inflight)

    def ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        return list(self._entries)

    async def get(self, adapter_id: str) -> V:
        entry = self._entries.get(adapter_id)
        if entry is not None:
            self._entries.move_to_end(adapter_id)
            return entry.value
        self._raise_if_failed_recently(adapter_id)
        # shield: a caller that gives up (cancelled) does not cancel the load the others wait on.
        return await asyncio.shield(self._start_load(adapter_id))

    def prefetch(self, adapter_id: str) -> None:
        """Start loading unless cached, loading, or failed recently; never raises, never waits."""
        if adapter_id in self._entries or adapter_id in self._inflight:
            return
        failure = self._failures.get(adapter_id)
        if failure is not None and failure.expires_at > self._clock():
            return
        self._start_load(adapter_id)

    def _start_load(self, adapter_id: str) -> asyncio.Task[V]:
        task = self._inflight.get(adapter_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_and_admit(adapter_id), name=f"load {adapter_id}")
            task.add_done_callback(_retrieve_exception)  # a prefetch nobody awaits must not warn
            self._inflight[adapter_id] = task
        return task

    async def _load_and_admit(self, adapter_id: str) -> V:
        log = structlog.get_logger().bind(adapter_id=adapter_id)
        try:
            value, nbytes = await self._load(adapter_id)
        except FATAL_ERRORS as exc:
            self._remember_failure(adapter_id, exc)
            log.info("adapter rejected", error=type(exc).__name__, reason=str(exc), negative_ttl_s=self.negative_ttl_s)
            raise
        finally:
            self._inflight.pop(adapter_id, None)
        self._admit(adapter_id, value, nbytes, log)
        return value

    def _admit(self, adapter_id: str, value: V, nbytes: int, log) -> None:
        self._failures.pop(adapter_id, None)
        self._entries[adapter_id] = _Entry(value, nbytes)
        self.used_bytes += nbytes
        # NOTE: the entry just admitted is never evicted by its own admission (its callers are
        # about to use it); an adapter larger than the whole budget stays alone until the next.
        while self.used_bytes > self.budget_bytes and len(self._entries) > 1:
            old_id, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes
            structlog.get_logger().bind(adapter_id=old_id).info("adapter evicted", nbytes=old.nbytes, used_bytes=self.used_bytes)
            if self._on_evict is not None:
                self._on_evict(old_id, old.value)
        if nbytes > self.budget_bytes:
            log.warning("adapter larger than budget", nbytes=nbytes, budget_bytes=self.budget_bytes)
        log.info("adapter cached", nbytes=nbytes, used_bytes=self.used_bytes, adapters=len(self._entries))

    def _remember_failure(self, adapter_id: str, exc: Exception) -> None:
        if self.negative_ttl_s <= 0 or self._negative_max == 0:
            return
        now = self._clock()
        while self._failures:  # drop expired ones from the front (amortised O(1))
            first = next(iter(self._failures.values()))
            if first.expires_at > now:
                break
            self._failures.popitem(last=False)
        self._failures.pop(adapter_id, None)
        self._failures[adapter_id] = _Failure(now + self.negative_ttl_s, type(exc), str(exc))
        while len(self._failures) > self._negative_max:
            self._failures.popitem(last=False)

    def _raise_if_failed_recently(self, adapter_id: str) -> None:
        failure = self._failures.get(adapter_id)
        if failure is None:
            return
        if failure.expires_at <= self._clock():
            del self._failures[adapter_id]
            return
        raise failure.error_type(failure.message)  # a fresh exception: no shared traceback state

    async def aclose(self) -> None:
        """Cancel loads in flight, then evict everything (on_evict runs for each entry)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.evict_all()

    def evict_all(self) -> None:
        while self._entries:
            old_id, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes
            if self._on_evict is not None:
                self._on_evict(old_id, old.value)


def _retrieve_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
