"""The gateway's one reader of many reply streams, against a real redis-server: every entry of
every subscribed stream in order up to its terminal one, a key subscribed during a blocking read,
tokens re-published after a Redis restart seen once, and a Redis that goes away and comes back."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.common.embedded import start_redis
from lorafleet.common.messages import DoneReply, TokenReply, done_entry, entry_fields, error_entry, token_entry
from lorafleet.common.replies import connect_redis
from lorafleet.gateway import reply_mux
from lorafleet.gateway.reply_mux import ReplyMux
from tests.faults.up_stack import Restartable
from tests.infra_fixtures import unique_name

pytestmark = pytest.mark.timeout(120)


async def _append(redis, key: str, entries) -> None:
    for entry in entries:
        await redis.xadd(key, entry_fields(entry))


async def _drain(sink: asyncio.Queue, count: int, timeout: float = 30) -> list:
    return [await asyncio.wait_for(sink.get(), timeout) for _ in range(count)]


def _reply(n_tokens: int, tag: str) -> list:
    tokens = [token_entry(f"{tag}{i}", [i], i) for i in range(n_tokens)]
    return [*tokens, done_entry("length", 3, n_tokens)]


async def test_many_streams_each_in_order_to_its_terminal_entry(redis_url):
    mux, redis = ReplyMux(redis_url), connect_redis(redis_url)
    await mux.start()
    try:
        keys = [unique_name("mux") for _ in range(40)]
        sinks = {key: asyncio.Queue() for key in keys}
        for key in keys:
            mux.subscribe(key, sinks[key])
        # written interleaved, while the reader blocks on all of them; one ends with an error
        for step in range(6):
            await asyncio.gather(*(_append(redis, key, [_reply(5, key)[step]]) for key in keys[1:]))
        await _append(redis, keys[0], [token_entry("a", [1], 0), error_entry("cancelled", "gone")])
        for key in keys[1:]:
            got = await _drain(sinks[key], 6)
            assert [k for k, _ in got] == [key] * 6 and [e for _, e in got] == _reply(5, key)
        assert [e for _, e in await _drain(sinks[keys[0]], 2)][-1].code == "cancelled"
        await _append(redis, keys[1], [token_entry("late", [9], 5)])  # after the terminal entry: never read
        await asyncio.sleep(0)
        assert sinks[keys[1]].empty() and mux.open_streams == 0
    finally:
        await mux.close()
        await redis.aclose()


async def test_a_key_subscribed_during_a_blocking_read_is_read_at_once(redis_url, monkeypatch):
    """With a block of 10 minutes, only the CLIENT UNBLOCK of subscribe() lets the new key in."""
    monkeypatch.setattr(reply_mux, "BLOCK_MS", 600_000)
    mux, redis = ReplyMux(redis_url), connect_redis(redis_url)
    await mux.start()
    try:
        mux.subscribe(unique_name("idle"), asyncio.Queue())  # nothing ever arrives: the reader blocks
        for _ in range(200):
            if mux._reading:
                break
            await asyncio.sleep(0.01)
        key, sink = unique_name("late"), asyncio.Queue()
        await _append(redis, key, _reply(2, "x"))
        mux.subscribe(key, sink)
        assert [e for _, e in await _drain(sink, 3, timeout=30)] == _reply(2, "x")
    finally:
        await mux.close()
        await redis.aclose()


async def test_re_published_tokens_are_seen_once_and_malformed_entries_skipped(redis_url):
    mux, redis = ReplyMux(redis_url), connect_redis(redis_url)
    await mux.start()
    try:
        key, sink = unique_name("dup"), asyncio.Queue()
        mux.subscribe(key, sink)
        await _append(redis, key, [token_entry("a", [1], 0), token_entry("b", [2, 3], 1)])
        await redis.xadd(key, {"type": "nonsense"})
        # an engine serving the request again after a Redis restart writes from its first lost token
        await _append(redis, key, [token_entry("b", [2, 3], 1), token_entry("c", [4], 3), done_entry("stop", 1, 4)])
        got = [e for _, e in await _drain(sink, 4)]
        assert [e.text for e in got if isinstance(e, TokenReply)] == ["a", "b", "c"]
        assert isinstance(got[-1], DoneReply)
        other = unique_name("twice")
        mux.subscribe(other, asyncio.Queue())
        with pytest.raises(ValueError, match="already subscribed"):  # two readers would split its entries
            mux.subscribe(other, asyncio.Queue())
    finally:
        await mux.close()
        await redis.aclose()


async def test_the_reader_outlives_a_redis_restart(tmp_path):
    server = Restartable(lambda port: start_redis(tmp_path, port=port))
    url = f"redis://127.0.0.1:{server.port}/0"
    mux, redis = ReplyMux(url), connect_redis(url)
    await mux.start()
    try:
        key, sink = unique_name("restart"), asyncio.Queue()
        mux.subscribe(key, sink)
        await _append(redis, key, [token_entry("a", [1], 0)])
        assert (await _drain(sink, 1))[0][1].text == "a"
        server.kill()
        server.start()  # no persistence: the stream is gone; the engine writes it again from token 0
        await redis.aclose()
        redis = connect_redis(url)  # the writer's old connection died with the server
        await _append(redis, key, [token_entry("a", [1], 0), token_entry("b", [2], 1), done_entry("stop", 1, 2)])
        got = [e for _, e in await _drain(sink, 2, timeout=60)]
        assert [getattr(e, "text", None) for e in got] == ["b", None] and isinstance(got[-1], DoneReply)
    finally:
        await mux.close()
        await redis.aclose()
        server.stop()
