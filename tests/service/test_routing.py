"""Routing: adapter affinity, hot adapters spread by rendezvous hashing, base requests spread."""

from __future__ import annotations

from collections import Counter

import pytest

from lorafleet.ingest.routing import (
    AdapterRates,
    Router,
    candidate_partitions,
    choose_partition,
    spread_for_rate,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_adapter_one_partition_when_not_hot():
    for adapter in ("a", "tenant-a/sql-v3", "x/y/z"):
        partitions = {choose_partition(f"req-{i}", adapter, 8, spread=1) for i in range(200)}
        assert partitions == {candidate_partitions(adapter, 8, 1)[0]}


def test_different_adapters_use_different_partitions():
    homes = Counter(candidate_partitions(f"adapter-{i}", 8, 1)[0] for i in range(400))
    assert set(homes) == set(range(8))
    assert max(homes.values()) < 2 * 400 / 8  # roughly balanced (hash), not all on one


def test_spread_covers_exactly_k_partitions_and_keeps_the_home():
    adapter = "hot/one"
    for k in range(1, 9):
        used = {choose_partition(f"r{i}", adapter, 8, spread=k) for i in range(2000)}
        assert used == set(candidate_partitions(adapter, 8, k))
        assert len(used) == k
        # rendezvous: growing k only adds partitions; the home partition stays
        assert set(candidate_partitions(adapter, 8, k - 1 or 1)) <= used
    assert candidate_partitions(adapter, 8, 99) == candidate_partitions(adapter, 8, 8)


def test_base_requests_spread_over_all_partitions_stably():
    counts = Counter(choose_partition(f"base-{i}", None, 8) for i in range(4000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 4000 / 8 * 0.7
    assert choose_partition("same-id", None, 8) == choose_partition("same-id", None, 8)


def test_spread_for_rate():
    assert spread_for_rate(0.0, 20, 8) == 1
    assert spread_for_rate(20.0, 20, 8) == 1
    assert spread_for_rate(20.1, 20, 8) == 2
    assert spread_for_rate(61, 20, 8) == 4
    assert spread_for_rate(10_000, 20, 8) == 8
    with pytest.raises(ValueError):
        spread_for_rate(1, 0, 8)


def test_rates_over_a_sliding_window():
    clock = FakeClock()
    rates = AdapterRates(window_s=10, cap=1000, clock=clock)
    for _ in range(50):
        rates.record("a")
        clock.now += 0.1  # 10 requests/s for 5 s
    assert rates.rate("a") == pytest.approx(50 / 10)
    clock.now += 6  # the first ~half of the requests leave the window
    assert rates.rate("a") < 50 / 10
    clock.now += 10
    assert rates.rate("a") == 0.0
    rates.record("b")  # sweeping forgets idle adapters
    assert len(rates) == 1


def test_rate_memory_is_capped():
    clock = FakeClock()
    rates = AdapterRates(window_s=10, cap=5, clock=clock)
    for _ in range(100):
        rates.record("a")
    assert rates.rate("a") == 5 / 10


def test_router_spreads_a_hot_adapter_and_keeps_cold_ones_home():
    clock = FakeClock()
    router = Router(n_partitions=8, per_partition_rate=5, window_s=1, clock=clock)
    cold_home = candidate_partitions("cold", 8, 1)[0]
    hot_used = Counter()
    order = []
    for i in range(300):  # "hot": 100 requests/s; "cold": ~3 requests/s
        clock.now += 0.01
        order.append(router.route(f"h{i}", "hot"))
        hot_used[order[-1]] += 1
        if i % 33 == 0:
            assert router.route(f"c{i}", "cold") == cold_home
    assert len(hot_used) == 8  # spread everywhere at 20x the per-partition rate
    home = candidate_partitions("hot", 8, 1)[0]
    assert order[:5] == [home] * 5  # below the per-partition rate: all at home
    assert {router.route(f"b{i}", None) for i in range(200)} == set(range(8))


def test_hash_routing_ignores_the_adapter_and_spreads_by_request_id():
    """LORAFLEET_INGEST_ROUTING=hash: the even spread affinity is measured against."""
    router = Router(n_partitions=8, per_partition_rate=5, window_s=1, clock=FakeClock(), affinity=False)
    routes = [router.route_and_kind(f"r{i}", "one-adapter") for i in range(400)]
    assert {kind for _, kind in routes} == {"hash"}
    assert {p for p, _ in routes} == set(range(8))  # one adapter's requests land everywhere
    assert [p for p, _ in routes] == [choose_partition(f"r{i}", None, 8) for i in range(400)]
    assert len(router.rates) == 0  # nothing measured: no rate decides anything


def test_ingest_refuses_an_unknown_routing_policy():
    from lorafleet.ingest.config import IngestConfig

    with pytest.raises(ValueError, match="routing must be one of affinity, hash"):
        IngestConfig(kafka_bootstrap="k:1", redis_url="redis://r", model_dir="m", routing="random")
