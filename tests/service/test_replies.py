"""ReplyWriter against a real redis-server: exactly-once entries, one round trip per publish.

Tests that count the server's commands (INFO commandstats is server-wide) or flush its scripts
get a redis-server of their own (`private_redis`): on the session's server any other client's
commands would be counted too."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.common import replies
from lorafleet.common.embedded import free_port, start_redis
from lorafleet.common.messages import done_entry, error_entry, parse_entry, token_entry
from lorafleet.common.replies import ReplyWriteError, ReplyWriter, state_key
from tests.infra_fixtures import unique_name


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def private_redis(tmp_path):
    """A client of a fresh redis-server that only this test uses."""
    server = start_redis(log_dir=tmp_path)
    client = aioredis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


async def read_stream(redis, key):
    return [parse_entry(fields) for _id, fields in await redis.xrange(key)]


def tokens_of(entries):
    return [t for e in entries if e.__class__.__name__ == "TokenReply" for t in e.token_ids]


async def test_redelivered_request_leaves_one_clean_stream(redis):
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    first_run = [(stream, rid, token_entry(f"t{i}", [i], index=i)) for i in range(5)]
    await writer.publish(first_run)
    assert await writer.published_count(rid) == (5, False)
    # the engine crashed; another engine serves the whole request again, same tokens (seeded)
    second_run = [(stream, rid, token_entry(f"t{i}", [i], index=i)) for i in range(10)]
    states = await writer.publish(second_run + [(stream, rid, done_entry("length", 3, 10))])
    assert (states[rid].tokens, states[rid].terminal, states[rid].appended) == (10, True, 6)
    entries = await read_stream(redis, stream)
    assert tokens_of(entries) == list(range(10))
    assert [e.index for e in entries[:-1]] == list(range(10))
    assert entries[-1] == done_entry("length", 3, 10)


async def test_only_the_first_terminal_entry_is_written(redis):
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    await writer.publish([(stream, rid, token_entry("a", [7, 8], index=0)),
                          (stream, rid, done_entry("stop", 2, 2))])
    states = await writer.publish([(stream, rid, error_entry("internal_error", "late failure.")),
                                   (stream, rid, token_entry("b", [9], index=2)),
                                   (stream, rid, done_entry("stop", 2, 3))])
    assert states[rid].appended == 0 and states[rid].terminal
    entries = await read_stream(redis, stream)
    assert entries == [token_entry("a", [7, 8], index=0), done_entry("stop", 2, 2)]
    assert await writer.published_count(rid) == (2, True)


async def test_out_of_sequence_tokens_are_refused(redis):
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    await writer.publish([(stream, rid, token_entry("ab", [1, 2], index=0))])
    states = await writer.publish([(stream, rid, token_entry("b", [2], index=1)),  # duplicate
                                   (stream, rid, token_entry("bc", [2, 3], index=1)),  # partial overlap
                                   (stream, rid, token_entry("d", [4], index=3))])  # gap
    assert (states[rid].appended, states[rid].conflicts, states[rid].tokens) == (0, 2, 2)
    assert len(await read_stream(redis, stream)) == 1
    with pytest.raises(ValueError):
        await writer.publish([(stream, rid, token_entry("", [], index=2))])


async def test_one_round_trip_for_a_whole_step(private_redis):
    writer = ReplyWriter(private_redis)
    await writer.prepare()
    ids = [unique_name("req") for _ in range(40)]
    step = []
    for rid in ids:  # one step: a token for each of 40 requests, a second one and done for some
        step.append((f"lorafleet:out:{rid}", rid, token_entry("x", [1], index=0)))
    for rid in ids[:10]:
        step.append((f"lorafleet:out:{rid}", rid, token_entry("y", [2], index=1)))
        step.append((f"lorafleet:out:{rid}", rid, done_entry("stop", 1, 2)))
    await private_redis.config_resetstat()
    before = writer.round_trips
    states = await writer.publish(step)
    assert writer.round_trips - before == 1
    stats = await private_redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # one script call for the whole step
    assert "cmdstat_script|exists" not in stats and "cmdstat_script|load" not in stats
    assert stats["cmdstat_xadd"]["calls"] == 60  # the script's own appends
    assert all(states[rid].terminal for rid in ids[:10]) and not any(states[rid].terminal for rid in ids[10:])


async def test_script_reloaded_after_redis_lost_it(private_redis):
    writer = ReplyWriter(private_redis)
    rid = unique_name("req")
    await writer.publish([(f"s:{rid}", rid, token_entry("a", [1], index=0))])
    await private_redis.script_flush()
    before = writer.round_trips
    states = await writer.publish([(f"s:{rid}", rid, token_entry("b", [2], index=1))])
    assert states[rid].tokens == 2 and writer.round_trips - before == 3  # NOSCRIPT, load, retry


async def test_expiry_and_cap(redis):
    writer = ReplyWriter(redis, maxlen=10, ttl_s=300)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    await writer.publish([(stream, rid, token_entry("t", [i], index=i)) for i in range(500)])
    await writer.publish([(stream, rid, done_entry("length", 1, 500))])
    assert await redis.xlen(stream) < 500  # MAXLEN ~ trims whole nodes, approximately
    assert 0 < await redis.ttl(stream) <= 300
    assert 0 < await redis.ttl(state_key(rid)) <= 300
    last = await redis.xrevrange(stream, count=1)
    assert parse_entry(last[0][1]) == done_entry("length", 1, 500)


async def test_a_refused_write_does_not_block_the_others(redis):
    writer = ReplyWriter(redis)
    good, bad = unique_name("req"), unique_name("req")
    await redis.set(f"plain:{bad}", "not a stream")
    states = await writer.publish([(f"plain:{bad}", bad, error_entry("invalid_request", "x.")),
                                   (f"lorafleet:out:{good}", good, error_entry("invalid_request", "y."))])
    assert states[bad].error and "WRONGTYPE" in states[bad].error
    assert states[good].terminal and states[good].error is None
    assert len(await read_stream(redis, f"lorafleet:out:{good}")) == 1


async def test_unreachable_redis_gives_up_after_its_budget():
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    writer = ReplyWriter(client, retry_budget_s=0.3)
    with pytest.raises(ReplyWriteError):
        await writer.publish([("s", "r", error_entry("invalid_request", "x."))])
    assert writer.round_trips >= 2  # it did retry
    await client.aclose()


async def test_published_counts_of_a_batch_in_one_round_trip(redis):
    writer = ReplyWriter(redis)
    done, partial, fresh = (unique_name(x) for x in ("done", "partial", "fresh"))
    await writer.publish([(f"lorafleet:out:{done}", done, token_entry("a", [1], index=0)),
                          (f"lorafleet:out:{done}", done, done_entry("stop", 2, 1)),
                          (f"lorafleet:out:{partial}", partial, token_entry("b", [2, 3], index=0))])
    before = writer.round_trips
    counts = await writer.published_counts([done, partial, fresh, partial])
    assert writer.round_trips == before + 1
    assert counts == {done: (1, True), partial: (2, False), fresh: (0, False)}
    assert await writer.published_counts([]) == {}


async def test_a_cancel_key_ends_the_stream_with_cancelled_at_the_next_publish(redis):
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    await writer.publish([(stream, rid, token_entry("a", [1], index=0))])
    await redis.set(f"lorafleet:cancel:{rid}", b"1")
    states = await writer.publish([(stream, rid, token_entry("b", [2], index=1))])
    assert states[rid].cancelled and states[rid].terminal and states[rid].tokens == 1
    later = await writer.publish([(stream, rid, token_entry("c", [3], index=2)), (stream, rid, done_entry("stop", 1, 3))])
    assert not later[rid].cancelled and later[rid].appended == 0  # one terminal entry, then nothing
    entries = await read_stream(redis, stream)
    assert entries[0] == token_entry("a", [1], index=0) and len(entries) == 2
    assert entries[1].code == "cancelled"


async def test_no_terminal_entry_after_a_gap_in_the_same_publish(redis):
    # What an engine sends after Redis restarted without its data: tokens from index 3 on, then done.
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    stream = f"lorafleet:out:{rid}"
    states = await writer.publish([(stream, rid, token_entry("d", [4], index=3)), (stream, rid, done_entry("length", 1, 4))])
    assert (states[rid].tokens, states[rid].terminal, states[rid].conflicts) == (0, False, 2)
    assert await redis.exists(stream) == 0
    whole = [(stream, rid, token_entry(c, [i], index=i)) for i, c in enumerate("abcd")]
    states = await writer.publish(whole + [(stream, rid, done_entry("length", 1, 4))])
    assert (states[rid].tokens, states[rid].terminal) == (4, True)


async def test_a_publish_over_one_chunk_is_still_one_round_trip(private_redis, monkeypatch):
    monkeypatch.setattr(replies, "PUBLISH_CHUNK", 3)
    writer = ReplyWriter(private_redis)
    await writer.prepare()
    ids = [unique_name("req") for _ in range(7)]
    await private_redis.config_resetstat()
    before = writer.round_trips
    states = await writer.publish([(f"lorafleet:out:{rid}", rid, token_entry("x", [1], index=0)) for rid in ids])
    assert writer.round_trips - before == 1
    assert (await private_redis.info("commandstats"))["cmdstat_evalsha"]["calls"] == 3  # 3 + 3 + 1 requests
    assert all(states[rid].tokens == 1 and states[rid].appended == 1 for rid in ids)


async def test_a_refused_stream_keeps_what_was_appended_before_it_counted(redis):
    """Redis refuses one request's stream in the middle of a publish: the requests around it are
    written, and its state counts only what its stream holds."""
    writer = ReplyWriter(redis)
    good, bad = unique_name("req"), unique_name("req")
    await redis.set(f"s:{bad}", "a string, not a stream")
    states = await writer.publish([(f"s:{good}", good, token_entry("a", [1], index=0)),
                                   (f"s:{bad}", bad, token_entry("b", [2], index=0)),
                                   (f"s:{good}", good, done_entry("stop", 1, 1))])
    assert "WRONGTYPE" in states[bad].error and states[bad].tokens == 0
    assert states[good].terminal and states[good].error is None
    assert await redis.hget(state_key(bad), "tokens") is None
    assert [type(e).__name__ for e in await read_stream(redis, f"s:{good}")] == ["TokenReply", "DoneReply"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40), min_size=1, max_size=5))
async def test_any_text_reaches_the_stream_unchanged(redis, texts):
    """The payload crosses into Lua as JSON (cjson): every text, NUL, quotes, escapes and non-BMP
    characters included, is read back exactly as written."""
    writer = ReplyWriter(redis)
    rid = unique_name("req")
    entries = [(f"s:{rid}", rid, token_entry(text, [i + 1], index=i)) for i, text in enumerate(texts)]
    await writer.publish(entries)
    got = await read_stream(redis, f"s:{rid}")
    assert [e.text for e in got] == texts and [e.index for e in got] == list(range(len(texts)))


async def test_a_publish_larger_than_one_script_call_writes_every_request(redis):
    """More requests than PUBLISH_CHUNK in one publish: split over several script calls, each
    request written once, in order, with its state."""
    writer = ReplyWriter(redis)
    run = unique_name("chunk")
    ids = [f"{run}-{i}" for i in range(2 * replies.PUBLISH_CHUNK + 3)]
    entries = [(f"lorafleet:out:{rid}", rid, entry) for rid in ids
               for entry in (token_entry("a", [1], index=0), done_entry("stop", 1, 1))]
    states = await writer.publish(entries)
    assert set(states) == set(ids) and all((s.tokens, s.terminal, s.appended) == (1, True, 2) for s in states.values())
    for rid in (ids[0], ids[replies.PUBLISH_CHUNK], ids[-1]):  # the first of each call, and the last
        assert await read_stream(redis, f"lorafleet:out:{rid}") == [token_entry("a", [1], 0), done_entry("stop", 1, 1)]


@pytest.mark.parametrize("entry", [token_entry("a", [1], index=-1), token_entry("", [], index=0)])
async def test_a_token_entry_without_an_index_or_tokens_is_refused_before_anything_is_written(redis, entry):
    writer = ReplyWriter(redis)
    rid = unique_name("bad")
    with pytest.raises(ValueError, match="needs >= 1 token id and index >= 0"):
        await writer.publish([(f"lorafleet:out:{rid}", rid, token_entry("ok", [2], index=0)),
                              (f"lorafleet:out:{rid}", rid, entry)])
    assert await redis.exists(f"lorafleet:out:{rid}") == 0
