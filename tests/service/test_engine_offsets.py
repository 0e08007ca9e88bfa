"""The engine's commit points: requests finish out of order, commits must not skip one. Checked
against a direct model (the first offset not done, else one past the last seen) for any order
of events (hypothesis)."""

from __future__ import annotations

import structlog
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.common.kafka import TopicSpec, ensure_topics, make_consumer
from lorafleet.engine.serving.offsets import OffsetCommitter, OffsetTracker
from tests.infra_fixtures import unique_name

A, B = TopicPartition("work", 0), TopicPartition("work", 1)


def test_a_message_done_out_of_order_waits_for_the_ones_before_it():
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.seen(A, offset)
    assert tracker.committable() == {A: 5}
    tracker.done(A, 6)
    assert tracker.committable() == {A: 5}  # 5 is not done: nothing past it
    tracker.committed({A: 5})
    assert tracker.committable() == {}  # unchanged point: no commit again
    tracker.done(A, 5)
    assert tracker.committable() == {A: 7}
    tracker.done(A, 7)
    assert tracker.committable() == {A: 8}


def test_partitions_are_independent_and_a_revoked_one_is_forgotten():
    tracker = OffsetTracker()
    tracker.seen(A, 0), tracker.seen(B, 10)
    tracker.done(B, 10)
    assert tracker.committable() == {A: 0, B: 11}
    tracker.forget([A])
    assert tracker.committable() == {B: 11}
    tracker.seen(A, 3)  # assigned again later: starts afresh
    assert tracker.committable() == {A: 3, B: 11}


events = st.lists(st.tuples(st.sampled_from([A, B]), st.integers(0, 30), st.booleans()), max_size=60)


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_commit_point_is_always_the_first_offset_not_done(script):
    tracker = OffsetTracker()
    seen: dict[TopicPartition, set[int]] = {}
    done: dict[TopicPartition, set[int]] = {}
    committed: dict[TopicPartition, int] = {}
    for tp, offset, finish in script:
        if offset not in seen.setdefault(tp, set()):
            seen[tp].add(offset)
            tracker.seen(tp, offset)
        elif finish and offset not in done.setdefault(tp, set()):
            done[tp].add(offset)
            tracker.done(tp, offset)
        points = tracker.committable()
        for part in seen:
            open_ = seen[part] - done.get(part, set())
            expected = min(open_) if open_ else max(seen[part]) + 1
            if expected > committed.get(part, -1):
                assert points.get(part) == expected
            else:
                assert part not in points
        tracker.committed(points)
        committed.update(points)


async def test_the_committer_commits_the_points_to_the_broker(kafka_bootstrap):
    """Against the real broker: soon() commits what the tracker allows, once per point, coalescing
    calls made while a commit runs."""
    topic, group = unique_name("offsets"), unique_name("offsets-group")
    await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    tp = TopicPartition(topic, 0)
    tracker = OffsetTracker()
    committer = OffsetCommitter(tracker, structlog.get_logger("test"))

    consumer = make_consumer(kafka_bootstrap, [], group)  # (a commit that fails: tests/faults/test_broker_faults.py)
    consumer.assign([tp])
    await consumer.start()
    for offset in range(4):
        tracker.seen(tp, offset)
    tracker.done(tp, 0), tracker.done(tp, 1), tracker.done(tp, 3)
    committer.soon(consumer)
    committer.soon(consumer)  # while one runs: coalesced into one more round, not a second task
    await committer._task
    assert await consumer.committed(tp) == 2 and tracker.committable() == {}
    tracker.done(tp, 2)
    try:
        await committer.commit(consumer)
        assert await consumer.committed(tp) == 4 and tracker.committable() == {}
        await committer.commit(None)  # an engine without a consumer (tests, draining): nothing to do
    finally:
        await consumer.stop()
