"""Which work-topic partition a request goes to: adapter affinity, with hot adapters spread.

Engines share the work topic through one consumer group, so a partition stands for an engine.
Requests of one adapter go to the same partition - the engine that already holds the adapter in
its GPU pool - and an adapter hot enough to overload one engine is spread over `k` partitions:

    candidates(adapter, k) = the k partitions with the highest hash(adapter, p)   (rendezvous)
    partition              = candidates[hash(request id) % k]

Rendezvous hashing keeps the choice stable as k grows (the top-1 partition stays among the
candidates, each step adds one) and spreads different adapters' candidates independently.
`k` = ceil(rate / per-partition rate), where rate is the adapter's requests per second over a
sliding window. Base-model requests (no adapter) need no affinity: hash of the request id.
All hashes are blake2b, stable across processes and restarts (unlike Python's hash()).

Cost: ranking an adapter hashes every partition, a fraction of a millisecond at a thousand, so
rankings are cached per adapter: the top RANK_DEPTH partitions of up to 2^17 adapters (a fleet's
worth: a cache smaller than the adapters in use misses on most requests when popularity is flat,
bench/results/fleet-sim), and full rankings of the few hot adapters spread wider than that.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from functools import lru_cache
from typing import Callable


def stable_hash(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


RANK_DEPTH = 8  # partitions kept per adapter in the large cache; a wider spread ranks them all


def candidate_partitions(adapter: str, n_partitions: int, spread: int) -> list[int]:
    """The `spread` partitions of highest rendezvous score for `adapter`, best first."""
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    spread = max(1, min(spread, n_partitions))
    if spread <= RANK_DEPTH:
        return list(_top_partitions(adapter, n_partitions)[:spread])
    return list(_ranked_partitions(adapter, n_partitions)[:spread])


@lru_cache(maxsize=1 << 17)  # every adapter in use: a short tuple each (tens of MB for 2^17)
def _top_partitions(adapter: str, n_partitions: int) -> tuple[int, ...]:
    return _rank(adapter, n_partitions, RANK_DEPTH)


@lru_cache(maxsize=1024)  # hot adapters spread over more than RANK_DEPTH partitions: few, routed often
def _ranked_partitions(adapter: str, n_partitions: int) -> tuple[int, ...]:
    return _rank(adapter, n_partitions, n_partitions)


def _rank(adapter: str, n_partitions: int, depth: int) -> tuple[int, ...]:
    """The first `depth` partitions in descending (stable_hash(adapter, str(p)), p) order.

    Same digests as stable_hash: blake2b of adapter + NUL, copied, then the partition number.
    heapq.nlargest(k, ...) equals sorted(..., reverse=True)[:k] and costs O(P log k)."""
    prefix = hashlib.blake2b(f"{adapter}\x00".encode(), digest_size=8)
    scored = []
    for p in range(n_partitions):
        h = prefix.copy()
        h.update(str(p).encode())
        scored.append((int.from_bytes(h.digest(), "big"), p))
    return tuple(p for _, p in heapq.nlargest(depth, scored))


def choose_partition(request_id: str, adapter: str | None, n_partitions: int, spread: int = 1) -> int:
    """Pure routing decision (see module doc); `spread` is ignored for base-model requests."""
    if adapter is None:
        if n_partitions < 1:
            raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
        return stable_hash(request_id) % n_partitions
    candidates = candidate_partitions(adapter, n_partitions, spread)
    return candidates[stable_hash(request_id) % len(candidates)]


def spread_for_rate(rate_per_s: float, per_partition_rate: float, n_partitions: int) -> int:
    """Partitions an adapter needs so none takes more than `per_partition_rate` of it."""
    if per_partition_rate <= 0:
        raise ValueError(f"per_partition_rate must be > 0, got {per_partition_rate}")
    return max(1, min(n_partitions, math.ceil(rate_per_s / per_partition_rate)))


class AdapterRates:
    """Requests per second of each adapter over the last `window_s` seconds.

    Keeps at most `cap` timestamps per adapter: beyond that the exact rate no longer changes the
    decision (the adapter is spread over every partition), so memory stays bounded however hot an
    adapter gets. Adapters idle for a whole window are forgotten.
    """

    def __init__(self, window_s: float, cap: int, clock: Callable[[], float]) -> None:
        if window_s <= 0 or cap < 1:
            raise ValueError(f"window_s must be > 0 and cap >= 1, got {window_s}, {cap}")
        self.window_s = window_s
        self.cap = cap
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._last_sweep = clock()

    def record(self, adapter: str) -> float:
        """Count one request of `adapter` now; returns its rate including this request."""
        now = self.clock()
        times = self._seen.setdefault(adapter, deque(maxlen=self.cap))
        times.append(now)
        self._expire(times, now)
        if now - self._last_sweep > self.window_s:
            self._sweep(now)
        return len(times) / self.window_s

    def rate(self, adapter: str) -> float:
        times = self._seen.get(adapter)
        if not times:
            return 0.0
        self._expire(times, self.clock())
        return len(times) / self.window_s

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def _sweep(self, now: float) -> None:
        for adapter in [a for a, t in self._seen.items() if not t or t[-1] <= now - self.window_s]:
            del self._seen[adapter]
        self._last_sweep = now

    def __len__(self) -> int:
        return len(self._seen)


ROUTING_POLICIES = ("affinity", "hash")  # LORAFLEET_INGEST_ROUTING


class Router:
    """Stateful wrapper: measures each adapter's rate and routes with :func:`choose_partition`;
    with `affinity=False`, every request by the hash of its id (the even spread affinity is
    measured against, bench/netbed/affinity_bench.py)."""

    def __init__(self, n_partitions: int, per_partition_rate: float, window_s: float,
                 clock: Callable[[], float], *, affinity: bool = True) -> None:
        self.n_partitions = n_partitions
        self.affinity = affinity
        self.per_partition_rate = per_partition_rate
        # Enough timestamps to reach spread == n_partitions, no more (see AdapterRates).
        cap = max(1, math.ceil(per_partition_rate * window_s * n_partitions) + 1)
        self.rates = AdapterRates(window_s, cap, clock)

    def route(self, request_id: str, adapter: str | None) -> int:
        return self.route_and_kind(request_id, adapter)[0]

    def route_and_kind(self, request_id: str, adapter: str | None) -> tuple[int, str]:
        """(partition, how it was chosen): "base" (no adapter: by request id), "home" (the
        adapter's one partition: every engine request of it lands where it is resident), "spread"
        (a hot adapter over several partitions), "hash" (affinity off: by request id)."""
        if not self.affinity:
            return choose_partition(request_id, None, self.n_partitions), "hash"
        if adapter is None:
            return choose_partition(request_id, None, self.n_partitions), "base"
        rate = self.rates.record(adapter)
        spread = spread_for_rate(rate, self.per_partition_rate, self.n_partitions)
        return choose_partition(request_id, adapter, self.n_partitions, spread), "home" if spread <= 1 else "spread"
