"""Hostile input against `lorafleet up` as a user sends it (the reliability issue's rows D1-D4,
D9, D10): every message ends as its request's `error` entry or a dead letter, and the stack keeps
serving. One stack for the module (real Tansu broker, redis-server, adapter store, ingest and
engine processes); each test ends by checking that `up` still runs and a plain request is served.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import redis.asyncio as aioredis

from lorafleet.client import LorafleetClient
from lorafleet.common import settings
from lorafleet.common.kafka import make_producer
from lorafleet.common.messages import DoneReply, ErrorReply
from tests.faults.up_stack import UpStack
from tests.infra_fixtures import unique_name
from tests.service.kafka_helpers import read_topic, wait_all_committed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("poison")
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), tmp / "adapters" / "t" / "a")
    up = UpStack(tmp, zoo.model("mha"), tmp / "adapters").start()
    yield up
    up.stop()


async def _produce(ready: dict, *values: bytes, key: bytes = b"k", max_request_size: int = 1 << 20) -> None:
    """Send values in one batch (one produce request: ingest fetches them together)."""
    producer = make_producer(ready["kafka_bootstrap"], max_request_size=max_request_size)
    await producer.start()
    try:
        futures = [await producer.send(ready["requests_topic"], value, key=key) for value in values]
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _terminal(client: LorafleetClient, request_id: str, stream: str | None = None):
    entries = [e async for e in client.replies(request_id if stream is None else None, stream=stream, timeout=90)]
    return entries[-1]


async def _still_serving(up: UpStack) -> None:
    up.alive()
    rid = unique_name("alive")
    async with LorafleetClient(up.ready["kafka_bootstrap"], up.ready["redis_url"]) as client:
        last = await _terminal(client, None, stream=await client.submit(
            {"id": rid, "adapter": "t/a", "prompt": "hello", "max_tokens": 3, "temperature": 0}))
    assert isinstance(last, DoneReply), last
    up.alive()


async def test_d1_deeply_nested_json_is_a_dead_letter_or_an_error(stack):
    ready = stack.ready
    deep = unique_name("deep")
    unreadable = b'{"id": "x", "p": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # 4 KB, 2,000 levels
    nested = json.dumps({"id": deep, "prompt": "hi", "extra": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})
    await _produce(ready, unreadable, nested.encode())
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        last = await _terminal(client, deep)
    assert isinstance(last, ErrorReply) and last.code == "invalid_request" and "nests more than 32 levels" in last.message
    await read_topic(ready["kafka_bootstrap"], ready["dlq_topic"],
                     where=lambda r: b"nested too deeply" in dict(r.headers)["reason"])
    await _still_serving(stack)


async def test_d2_out_of_range_numbers_get_an_error_entry(stack):
    ready = stack.ready
    cases = {"top_k": 2 ** 63, "max_tokens": 2 ** 63, "seed": 2 ** 64, "temperature": 1e308}
    ids = {field: unique_name(f"num-{field}") for field in cases}
    await _produce(ready, *(json.dumps({"id": ids[f], "prompt": "hi", f: v}).encode() for f, v in cases.items()))
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        for field, rid in ids.items():
            last = await _terminal(client, rid)
            assert isinstance(last, ErrorReply) and last.code == "invalid_request" and field in last.message, last
    await _still_serving(stack)


async def test_d3_one_id_twice_in_a_batch_with_two_reply_streams(stack):
    ready = stack.ready
    rid = unique_name("twice")
    bad = [json.dumps({"id": rid, "prompt": "hi", "max_tokens": 0, "reply_stream": f"{rid}-{n}"}).encode() for n in (1, 2)]
    await _produce(ready, *bad)
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        last = await _terminal(client, None, stream=f"{rid}-1")  # the first delivery's outcome
        assert isinstance(last, ErrorReply) and "max_tokens" in last.message
        assert await client.redis.exists(f"{rid}-2") == 0
    await _still_serving(stack)


async def test_d4_a_message_over_the_producer_limit_is_dead_lettered_cut(stack):
    ready = stack.ready
    huge = b"\x00not json" + b"x" * (1536 << 10)  # 1.5 MB: the broker takes it, a DLQ copy would not fit
    await _produce(ready, huge, key=b"huge", max_request_size=4 << 20)
    # ingest committed the message: its dead letter is written, and the topic read whole holds one
    await wait_all_committed(ready["kafka_bootstrap"], settings.read("INGEST_GROUP"), ready["requests_topic"])
    letters = await read_topic(ready["kafka_bootstrap"], ready["dlq_topic"], where=lambda r: r.key == b"huge")
    (letter,) = [r for r in letters if r.key == b"huge"]
    headers = dict(letter.headers)
    assert b"exceeds the limit" in headers["reason"] and headers["truncated"] == b"1"
    assert int(headers["original_bytes"]) == len(huge) and letter.value == huge[:len(letter.value)]
    await _still_serving(stack)


async def test_d9_thousands_of_stop_strings_are_refused(stack):
    ready = stack.ready
    rid = unique_name("stops")
    await _produce(ready, json.dumps({"id": rid, "prompt": "hi", "stop": [f"s{i}" for i in range(20000)]}).encode())
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        last = await _terminal(client, rid)
    assert isinstance(last, ErrorReply) and "stop has 20000 strings; the limit is 16" in last.message
    await _still_serving(stack)


async def test_d10_reply_stream_naming_a_key_of_another_type(stack):
    ready = stack.ready
    taken = unique_name("taken")  # a plain string key where the replies should go
    redis = aioredis.from_url(ready["redis_url"])
    await redis.set(taken, "not a stream")
    served, rejected = unique_name("served"), unique_name("rejected")
    await _produce(ready,
                   json.dumps({"id": served, "prompt": "hi", "max_tokens": 4, "reply_stream": taken}).encode(),
                   json.dumps({"id": rejected, "prompt": "hi", "max_tokens": 0, "reply_stream": taken}).encode())
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        for rid, path in ((served, "engine"), (rejected, "ingest")):
            last = await _terminal(client, rid)  # on the default stream
            assert isinstance(last, ErrorReply) and last.code == "invalid_request", (path, last)
            assert "could not be written" in last.message and "WRONGTYPE" in last.message, (path, last)
    assert await redis.get(taken) == b"not a stream"
    await redis.aclose()
    await _still_serving(stack)
