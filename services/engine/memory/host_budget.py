"""How much host memory an engine gives to packed adapters, when the config leaves it to the work.

A pack (adapter_pack.py) is an adapter in the pool's page layout, ready for one copy to the GPU.
A pack dropped before its request is admitted, or before its adapter is loaded again after a pool
eviction, is packed again on the engine's critical path: with a fixed 2 GiB budget and S2's
adapters (rank 64 at Llama-7B: 128 MiB each) only 16 fit, against hundreds of distinct adapters
in a long trace. So the budget follows the work:

    budget = clamp(2 x packs of the distinct adapters of the requests in the engine, floor, ceiling)
    ceiling = a quarter of the host memory available when the engine starts (cgroup-aware)

Twice the demand keeps every waiting request's pack from arrival to admission and leaves as much
again for adapters of finished requests, which popular adapters reuse. The budget rises with the
demand at once and falls slowly (a share per engine step): between two bursts the demand drops to
nothing, and following it down would drop exactly the packs the next burst's popular adapters
reuse. A lower budget drops packs only as new ones come in (HostAdapterCache.resize). AdapterDemand counts the
demand as requests come and go (the scheduler owns it: O(1) per request, no per-step scan).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CEILING_SHARE = 4  # the ceiling is 1/CEILING_SHARE of the host memory available at start
FLOOR_BYTES = 512 << 20
SHRINK_PER_STEP = 1 / 1024  # halves in about 700 steps (tens of seconds at GPU step times)


def available_host_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Host memory this process can still use: the machine's available memory, and under a cgroup
    v2 memory limit (a Kubernetes container) no more than that limit minus what the group uses."""
    available = _meminfo_available()
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the machine's figure stands
    return max(available, 0)


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


@dataclass(frozen=True)
class PackBudget:
    floor: int
    ceiling: int

    @classmethod
    def from_host(cls, available: int | None = None) -> "PackBudget":
        ceiling = (available_host_bytes() if available is None else available) // CEILING_SHARE
        return cls(floor=min(FLOOR_BYTES, ceiling), ceiling=ceiling)

    def for_demand(self, demand_bytes: int) -> int:
        return min(self.ceiling, max(self.floor, 2 * demand_bytes))

    def next_budget(self, budget: int, demand_bytes: int, step: bool) -> int:
        """The budget after `budget`: up to the demand's at once; down by SHRINK_PER_STEP of it per
        engine step (step=False, an arrival: never down)."""
        target, budget = self.for_demand(demand_bytes), min(budget, self.ceiling)
        if target >= budget:
            return target
        return max(target, int(budget * (1 - SHRINK_PER_STEP))) if step else budget


class AdapterDemand:
    """Bytes of the packs of the distinct adapters that requests in the engine use."""

    def __init__(self) -> None:
        self._requests: Counter[str] = Counter()  # adapter id -> requests in the engine using it
        self._bytes_of: dict[str, int] = {}
        self.bytes = 0

    def add(self, adapter_id: str, pack_bytes: int) -> None:
        if self._requests[adapter_id] == 0:
            self._bytes_of[adapter_id] = pack_bytes
            self.bytes += pack_bytes
        self._requests[adapter_id] += 1

    def remove(self, adapter_id: str) -> None:
        self._requests[adapter_id] -= 1
        if self._requests[adapter_id] == 0:
            del self._requests[adapter_id]
            self.bytes -= self._bytes_of.pop(adapter_id)

    @property
    def distinct(self) -> int:
        return len(self._requests)
