"""Redis faults under a real `lorafleet up` (the reliability issue's rows D7, D8): Redis killed and
restarted without its data mid-generation, and Redis away for longer than the services' retry
budget. Nothing is lost (every token of every request once, in order, then one `done`) and no
service exits: `up` runs with LORAFLEET_UP_RESTART_LIMIT=0, so any service's exit stops it.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from lorafleet.client import LorafleetClient
from lorafleet.common.embedded import start_redis
from lorafleet.common.messages import DoneReply, TokenReply, parse_entry
from tests.faults.up_stack import Restartable, UpStack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def stack(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis-faults")
    redis = Restartable(lambda port: start_redis(tmp, port=port))  # no persistence: a restart loses all
    up = UpStack(tmp, zoo.model("mha"), tmp, "--redis-url", f"redis://127.0.0.1:{redis.port}/0",
                 env={"LORAFLEET_UP_RESTART_LIMIT": "0", "LORAFLEET_REDIS_RETRY_S": "2"}).start()
    yield up, redis
    up.stop()
    redis.stop()


def _request(rid: str) -> dict:
    return {"id": rid, "prompt": "the sea", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


async def _whole_stream(ready: dict, rid: str) -> list:
    """The stream as it is in Redis once its terminal entry is there (XRANGE: no client-side skipping)."""
    async with LorafleetClient(None, ready["redis_url"]) as client:
        [e async for e in client.replies(rid, timeout=120)]
        rows = await client.redis.xrange(f"lorafleet:out:{rid}")
    return [parse_entry(fields) for _, fields in rows]


def _assert_complete(entries: list, reference: list[int]) -> None:
    tokens = [e for e in entries if isinstance(e, TokenReply)]
    assert [e.index for e in tokens] == [sum(len(t.token_ids) for t in tokens[:i]) for i in range(len(tokens))]
    assert [t for e in tokens for t in e.token_ids] == reference
    assert isinstance(entries[-1], DoneReply) and sum(isinstance(e, DoneReply) for e in entries) == 1


async def _reference(ready: dict) -> list[int]:
    rid = unique_name("ref")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        generation = await client.generate(_request(rid), timeout=120)
    return generation.token_ids


async def test_d7_redis_restarted_mid_generation_loses_no_token(stack):
    up, redis = stack
    ready = up.ready
    reference = await _reference(ready)
    rid = unique_name("d7")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_request(rid))
        seen = 0
        async for entry in client.replies(rid, timeout=120):
            seen += isinstance(entry, TokenReply)
            if seen == 3:
                break
    redis.kill()  # no persistence: the stream, the writer's state and its script are gone
    await asyncio.sleep(1)
    redis.start()
    _assert_complete(await _whole_stream(ready, rid), reference)
    up.alive()


async def test_d8_redis_away_longer_than_the_retry_budget(stack):
    up, redis = stack
    ready = up.ready
    reference = await _reference(ready)
    running, sent_during = unique_name("d8-running"), unique_name("d8-during")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_request(running))
        async for entry in client.replies(running, timeout=120):
            if isinstance(entry, TokenReply):
                break
        redis.kill()
        await client.submit(_request(sent_during))  # Kafka is up: ingest takes it, then waits for Redis
    await asyncio.sleep(8)  # four times LORAFLEET_REDIS_RETRY_S
    up.alive()
    redis.start()
    for rid in (running, sent_during):
        _assert_complete(await _whole_stream(ready, rid), reference)
    up.alive()
    probe = aioredis.from_url(ready["redis_url"])
    assert await probe.ping()
    await probe.aclose()


def test_a_gateway_stream_outlives_a_redis_restart(stack):
    """A streamed answer in flight when Redis restarts (losing its stream) ends complete, each
    token once: the engine writes the lost entries again, the gateway drops those it had sent."""
    import openai

    up, redis = stack
    client = openai.OpenAI(base_url=up.ready["gateway"], api_key="unused", max_retries=0, timeout=120)
    # long enough to be mid-generation when Redis goes (40 tokens may be done before the kill)
    options = dict(model="mha", prompt="the sea", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**options).choices[0].text
    stream = client.completions.create(**options, stream=True)
    texts = [next(stream).choices[0].text for _ in range(3)]
    redis.kill()
    redis.start()
    texts += [chunk.choices[0].text for chunk in stream]
    assert "".join(texts) == expected
    up.alive()
