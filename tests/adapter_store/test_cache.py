"""Single-flight loading, the LRU byte budget and the negative cache, through the real store
(local root, real PEFT files); reads are counted by the store's own fetch layer."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from lorafleet.adapter_store.cache import LoadingLRU
from lorafleet.adapter_store.errors import AdapterNotFoundError, InvalidAdapterError
from lorafleet.adapter_store.store import AdapterStore


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(adapter_root, spec, *, memory_bytes=1 << 24, negative_ttl_s=5.0, clock=None) -> AdapterStore:
    store = AdapterStore.from_root(
        str(adapter_root.path), spec, memory_bytes=memory_bytes, max_adapter_bytes=1 << 20, negative_ttl_s=negative_ttl_s
    )
    if clock is not None:
        store.cache._clock = clock
    return store


async def test_concurrent_gets_share_one_storage_read(adapter_root, spec):
    adapter_root.add("hot/one", like="r8_all")
    store = make_store(adapter_root, spec)
    with capture_logs() as logs:
        results = await asyncio.gather(*[store.get("hot/one") for _ in range(25)])
    assert store.source.stats.fetches == 1
    cached = [e for e in logs if e["event"] == "adapter cached"]
    assert len(cached) == 1 and cached[0]["adapter_id"] == "hot/one"
    assert store.source.stats.lists == 1 and store.source.stats.gets == 2
    assert all(r is results[0] for r in results)
    await store.get("hot/one")  # cached now: still one read
    assert store.source.stats.fetches == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_load(adapter_root, spec):
    adapter_root.add("x")
    store = make_store(adapter_root, spec)
    impatient = asyncio.ensure_future(store.get("x"))
    patient = asyncio.ensure_future(store.get("x"))
    await asyncio.sleep(0)
    impatient.cancel()
    weights = await patient
    assert weights.config.rank == 4 and "x" in store.cache
    assert store.source.stats.fetches == 1


async def test_lru_evicts_least_recently_used_past_the_byte_budget(adapter_root, spec):
    for name in "abcd":
        adapter_root.add(f"lru/{name}", like="r4_qv")
    one = (await make_store(adapter_root, spec).get("lru/a")).nbytes
    store = make_store(adapter_root, spec, memory_bytes=3 * one)
    for name in "abc":
        await store.get(f"lru/{name}")
    await store.get("lru/a")  # a becomes the most recently used
    await store.get("lru/d")  # over budget: b, the least recently used, goes
    assert store.cache.ids() == ["lru/c", "lru/a", "lru/d"]
    assert store.cache.used_bytes == 3 * one
    fetches = store.source.stats.fetches
    await store.get("lru/a")  # still cached
    assert store.source.stats.fetches == fetches
    await store.get("lru/b")  # evicted: fetched again, and c goes
    assert store.source.stats.fetches == fetches + 1
    assert store.cache.ids() == ["lru/d", "lru/a", "lru/b"]


async def test_a_large_adapter_evicts_as_many_small_ones_as_needed(adapter_root, spec):
    for name in "abc":
        adapter_root.add(f"small/{name}", like="r4_qv")
    adapter_root.add("large", like="r8_all")
    probe = make_store(adapter_root, spec)
    small, large = (await probe.get("small/a")).nbytes, (await probe.get("large")).nbytes
    assert large > 2 * small
    store = make_store(adapter_root, spec, memory_bytes=large + small)
    for name in "abc":
        await store.get(f"small/{name}")
    await store.get("large")
    assert store.cache.ids() == ["small/c", "large"]
    assert store.cache.used_bytes == large + small <= store.cache.budget_bytes


@pytest.mark.parametrize("kind", ["not_found", "invalid"])
async def test_fatal_results_are_cached_for_the_negative_ttl(kind, adapter_root, spec, broken_adapter_kinds):
    clock = ManualClock()
    store = make_store(adapter_root, spec, negative_ttl_s=5.0, clock=clock)
    error = AdapterNotFoundError if kind == "not_found" else InvalidAdapterError
    if kind == "invalid":
        broken_adapter_kinds["nan_values"][0](adapter_root, "flood")
    # A flood, concurrent then sequential: one storage read.
    results = await asyncio.gather(*[store.get("flood") for _ in range(20)], return_exceptions=True)
    assert all(isinstance(r, error) for r in results)
    for _ in range(30):
        clock.now += 0.1
        with pytest.raises(error):
            await store.get("flood")
    assert store.source.stats.fetches == 1
    # The adapter is fixed in storage; within the TTL the old answer still stands...
    if kind == "invalid":
        adapter_root.remove("flood")
    adapter_root.add("flood")
    with pytest.raises(error):
        await store.get("flood")
    assert store.source.stats.fetches == 1
    # ...and once the TTL has passed storage is asked again.
    clock.now += 5.0
    assert (await store.get("flood")).config.rank == 4
    assert store.source.stats.fetches == 2


async def test_zero_negative_ttl_asks_storage_every_time(adapter_root, spec):
    store = make_store(adapter_root, spec, negative_ttl_s=0.0)
    for _ in range(3):
        with pytest.raises(AdapterNotFoundError):
            await store.get("missing")
    assert store.source.stats.fetches == 3


async def test_prefetch_loads_in_the_background_once(adapter_root, spec, broken_adapter_kinds):
    adapter_root.add("pre/good")
    broken_adapter_kinds["wrong_shapes"][0](adapter_root, "pre/bad")
    store = make_store(adapter_root, spec)
    store.prefetch("pre/good")
    store.prefetch("pre/good")
    store.prefetch("pre/bad")  # fails in the background: no exception here, none unretrieved
    for _ in range(500):
        if "pre/good" in store.cache and store.cache.loading == 0:
            break
        await asyncio.sleep(0.01)
    assert "pre/good" in store.cache
    await store.get("pre/good")
    with pytest.raises(InvalidAdapterError, match="shape"):
        await store.get("pre/bad")  # remembered from the prefetch
    assert store.source.stats.fetches == 2
    with pytest.raises(ValueError):
        store.prefetch("../x")


async def test_ten_thousand_small_entries_evict_in_lru_order():
    async def load(adapter_id: str):
        if adapter_id.startswith("missing"):
            raise AdapterNotFoundError(adapter_id)
        return adapter_id.upper(), 10

    cache: LoadingLRU[str] = LoadingLRU(load, budget_bytes=10 * 5000, negative_ttl_s=60.0, negative_max_entries=100)
    with capture_logs() as logs:  # also keeps 15000 log lines off the console
        for i in range(10_000):
            assert await cache.get(f"a{i}") == f"A{i}"
    evicted = [e["adapter_id"] for e in logs if e["event"] == "adapter evicted"]
    assert evicted == [f"a{i}" for i in range(5000)]
    assert len(cache) == 5000 and cache.used_bytes == 50_000
    assert cache.ids()[0] == "a5000" and cache.ids()[-1] == "a9999"
    for i in range(300):
        with pytest.raises(AdapterNotFoundError):
            await cache.get(f"missing{i}")
    assert len(cache._failures) == 100  # the negative cache is bounded too
