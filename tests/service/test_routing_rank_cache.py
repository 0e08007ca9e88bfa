"""The cached, partial ranking of partitions decides exactly as the plain full sort of every
partition by rendezvous score (the definition in services/ingest/routing.py's module doc)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.ingest.routing import RANK_DEPTH, candidate_partitions, choose_partition, stable_hash


def reference_candidates(adapter: str, n_partitions: int, spread: int) -> list[int]:
    ranked = sorted(range(n_partitions), key=lambda p: (stable_hash(adapter, str(p)), p), reverse=True)
    return ranked[:max(1, min(spread, n_partitions))]


@settings(max_examples=300, deadline=None)
@given(adapter=st.text(min_size=0, max_size=40), n_partitions=st.integers(1, 300),
       spread=st.integers(-2, 320))
def test_candidates_equal_the_full_sort(adapter, n_partitions, spread):
    assert candidate_partitions(adapter, n_partitions, spread) == reference_candidates(adapter, n_partitions, spread)


@settings(max_examples=100, deadline=None)
@given(adapter=st.text(max_size=20), request_id=st.text(max_size=20), n_partitions=st.integers(1, 64),
       spread=st.integers(1, 64))
def test_choice_equals_the_reference_choice(adapter, request_id, n_partitions, spread):
    expected = reference_candidates(adapter, n_partitions, spread)
    expected_choice = expected[stable_hash(request_id) % len(expected)]
    assert choose_partition(request_id, adapter, n_partitions, spread) == expected_choice


def test_spreads_across_the_cache_depth_agree_at_fleet_scale():
    # 1,000 partitions, spreads on both sides of RANK_DEPTH: the short and the full cache agree
    for adapter in ("tenant-7/sql", "adapter-0", "adapter-99999"):
        full = reference_candidates(adapter, 1000, 1000)
        for spread in (1, RANK_DEPTH - 1, RANK_DEPTH, RANK_DEPTH + 1, 40, 1000):
            assert candidate_partitions(adapter, 1000, spread) == full[:spread]
