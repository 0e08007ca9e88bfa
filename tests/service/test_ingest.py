"""Ingest against a real Tansu broker and redis-server: good requests reach the work topic with
token ids, bad ones get exactly one error entry, unreadable ones land in the dead-letter topic."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from lorafleet.client import LorafleetClient
from lorafleet.common.contract import read_envelope
from lorafleet.common.messages import ErrorReply, decode_work_item
from lorafleet.demo.tokenizer import CHAT_TEMPLATE
from lorafleet.ingest.config import IngestConfig
from lorafleet.ingest.routing import candidate_partitions
from lorafleet.ingest.service import run_ingest
from tests.infra_fixtures import unique_name
from tests.service.conftest import CONTEXT_LEN
from tests.service.kafka_helpers import read_topic, wait_all_committed

WORK_PARTITIONS = 4


# The demo's chat template, refusing one role as released templates refuse turns out of order.
STRICT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'forbidden' %}"
    "{{ raise_exception('the role forbidden is not allowed') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
)


def make_config(kafka_bootstrap, redis_url, model_dir, chat_template: str = "") -> IngestConfig:
    prefix = unique_name("t")
    return IngestConfig(chat_template=chat_template,
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, model_dir=model_dir,
        requests_topic=f"{prefix}.requests", dlq_topic=f"{prefix}.dlq", work_topic=f"{prefix}.work",
        requests_partitions=2, work_partitions=WORK_PARTITIONS, group_id=f"{prefix}-ingest",
        drain_timeout_s=10, session_timeout_ms=2000,
    )


@pytest.fixture
async def ingest(kafka_bootstrap, redis_url, model_dir, tmp_path):
    """A running ingest service (with STRICT_CHAT_TEMPLATE given as its --chat-template); teardown
    checks that it drains and returns on stop."""
    (tmp_path / "chat.jinja").write_text(STRICT_CHAT_TEMPLATE)
    config = make_config(kafka_bootstrap, redis_url, model_dir, chat_template=str(tmp_path / "chat.jinja"))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_ingest(config, stop=stop, ready=ready))
    await asyncio.wait({task, asyncio.create_task(ready.wait())}, timeout=60,
                       return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.is_set()
    client = LorafleetClient(kafka_bootstrap, redis_url, requests_topic=config.requests_topic)
    await client.start()
    yield config, client
    await client.close()
    stop.set()
    await asyncio.wait_for(task, config.drain_timeout_s + 5)


GOOD = [
    {"id": "good-text-1", "adapter": "tenant-a/sql-v3", "prompt": "Hello world", "max_tokens": 8},
    {"id": "good-text-2", "adapter": "tenant-a/sql-v3", "prompt": "the cat sat", "seed": 3, "stop": ["."],
     "max_tokens": 50},
    {"id": "good-ids", "prompt_token_ids": [1, 5, 511], "max_tokens": 61, "temperature": 0},
    {"id": "good-base", "prompt": "caf\u00e9 \u2615", "max_tokens": 4, "reply_stream": "custom:stream:1"},
    {"id": "good-chat", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
     "max_tokens": 3},
]
# What the chat template renders good-chat to (the tokenizer adds the BOS the template writes).
GOOD_CHAT_TEXT = "system: be brief\nuser: hi\nassistant:"
BAD = {  # id -> (request, expected code, a word the message must contain)
    "bad-max-tokens": ({"prompt": "x", "max_tokens": 0}, "invalid_request", "max_tokens"),
    "bad-both-prompts": ({"prompt": "x", "prompt_token_ids": [1]}, "invalid_request", "prompt_token_ids"),
    "bad-token-id": ({"prompt_token_ids": [1, 512]}, "invalid_request", "vocab size"),
    "bad-adapter": ({"prompt": "x", "adapter": "../etc"}, "invalid_request", "adapter id"),
    "bad-reply-stream": ({"prompt": "x", "reply_stream": 7}, "invalid_request", "reply_stream"),
    "bad-temperature": ({"prompt": "x", "temperature": -1}, "invalid_request", "temperature"),
    "too-long-ids": ({"prompt_token_ids": [1] * 60, "max_tokens": 5}, "prompt_too_long", "context of 64"),
    "too-long-text": ({"prompt": "word " * 80, "max_tokens": 1}, "prompt_too_long", "max_tokens (1)"),
    "bad-chat-turn": ({"messages": [{"role": "user"}]}, "invalid_request", "messages[0].content"),
    "bad-chat-refused": ({"messages": [{"role": "forbidden", "content": "x"}]}, "invalid_request",
                         "the role forbidden is not allowed"),
    "too-long-chat": ({"messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 1},
                      "prompt_too_long", "context of 64"),
}
UNREADABLE = [  # raw value -> reason fragment
    (b"\x00\x01 not json", "not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"prompt": "no id"}', "no id field"),
    (b'{"id": "has space", "prompt": "x"}', "is not 1-128 characters"),
]


async def test_good_bad_and_unreadable_requests(ingest, kafka_bootstrap, redis_url, model_dir):
    config, client = ingest
    run = unique_name("run")
    good = [{**r, "id": f"{run}-{r['id']}"} for r in GOOD]
    bad = {f"{run}-{rid}": (req, code, word) for rid, (req, code, word) in BAD.items()}
    # interleave good, bad and unreadable messages
    for index, request in enumerate(good):
        await client.submit(request)
        for rid, (req, _, _) in list(bad.items())[3 * index:3 * index + 3]:
            await client.submit({"id": rid, **req})
        if index < len(UNREADABLE):
            await client.submit_raw(UNREADABLE[index][0], key=b"k")

    await assert_all_committed(kafka_bootstrap, config)  # every outcome is durable: read them whole
    work = await read_topic(kafka_bootstrap, config.work_topic, len(good))
    items = {decode_work_item(r.value).id: (decode_work_item(r.value), r.partition) for r in work}
    assert set(items) == {r["id"] for r in good}  # exactly the good ones, each once
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sent = {}  # request id -> its requests-topic record's timestamp (the producer's clock)
    for record in await read_topic(kafka_bootstrap, config.requests_topic, len(good) + len(bad) + len(UNREADABLE)):
        sent[read_envelope(record.value).request_id] = record.timestamp
    for request in good:
        item, partition = items[request["id"]]
        text = GOOD_CHAT_TEXT if "messages" in request else request.get("prompt")
        expected = request.get("prompt_token_ids") or tokenizer(text)["input_ids"]
        assert item.prompt_token_ids == expected
        assert item.max_tokens == request.get("max_tokens", 256)
        assert item.reply_stream == request.get("reply_stream", f"lorafleet:out:{request['id']}")
        assert item.submitted_at == sent[request["id"]] / 1000 <= item.received_at + 1  # queue time starts here
        if request.get("adapter"):  # affinity: a cold adapter stays on its home partition
            assert partition == candidate_partitions(request["adapter"], WORK_PARTITIONS, 1)[0]
    assert tokenizer.decode(items[good[3]["id"]][0].prompt_token_ids, skip_special_tokens=True) == "caf\u00e9 \u2615"

    for rid, (_, code, word) in bad.items():
        entries = [e async for e in client.replies(rid, timeout=30)]
        assert len(entries) == 1 and isinstance(entries[0], ErrorReply)
        assert entries[0].code == code and word in entries[0].message
        assert await client.redis.xlen(f"lorafleet:out:{rid}") == 1  # exactly one entry

    dead = await read_topic(kafka_bootstrap, config.dlq_topic, len(UNREADABLE))
    assert len(dead) == len(UNREADABLE)
    for record, (raw, reason) in zip(sorted(dead, key=lambda r: UNREADABLE_ORDER(r.value)), UNREADABLE):
        headers = dict(record.headers)
        assert record.value == raw and record.key == b"k"
        assert reason in headers["reason"].decode()
        assert headers["source_topic"].decode() == config.requests_topic
        assert int(headers["partition"]) in (0, 1) and int(headers["offset"]) >= 0


def UNREADABLE_ORDER(value: bytes) -> int:
    return [raw for raw, _ in UNREADABLE].index(value)


async def assert_all_committed(bootstrap: str, config: IngestConfig) -> None:
    """Ingest's group has committed every request message (read as an outsider: no join)."""
    await wait_all_committed(bootstrap, config.group_id, config.requests_topic)


async def test_restart_resumes_after_committed_offsets(kafka_bootstrap, redis_url, model_dir):
    config = make_config(kafka_bootstrap, redis_url, model_dir)
    async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=config.requests_topic) as client:
        for round_number in range(2):
            stop, ready = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(run_ingest(config, stop=stop, ready=ready))
            await asyncio.wait_for(ready.wait(), 60)
            await client.submit({"id": f"{config.group_id}-r{round_number}", "prompt": "hi", "max_tokens": 4})
            await assert_all_committed(kafka_bootstrap, config)
            work = await read_topic(kafka_bootstrap, config.work_topic, round_number + 1)
            stop.set()
            await asyncio.wait_for(task, 15)
        ids = sorted(decode_work_item(r.value).id for r in work)
        assert ids == [f"{config.group_id}-r0", f"{config.group_id}-r1"]  # r0 not served twice


def test_config_from_cli_flags(monkeypatch, tmp_path):
    import argparse

    monkeypatch.setenv("LORAFLEET_WORK_PARTITIONS", "3")
    parser = argparse.ArgumentParser()
    IngestConfig.add_arguments(parser)
    args = parser.parse_args(["--kafka-bootstrap", "k:1", "--model", str(tmp_path)])
    config = IngestConfig.from_args(args)
    assert (config.kafka_bootstrap, config.work_partitions, config.model_dir) == ("k:1", 3, tmp_path)
    with pytest.raises(ValueError, match="--model"):
        IngestConfig.from_args(parser.parse_args(["--model", ""]))
    with pytest.raises(ValueError, match="three different topics"):
        replace(config, dlq_topic=config.work_topic)
    assert CONTEXT_LEN == 64


async def test_two_members_share_the_requests_topic(kafka_bootstrap, redis_url, model_dir):
    """A second ingest joining the group triggers a rebalance; nothing is lost or stuck."""
    config = make_config(kafka_bootstrap, redis_url, model_dir)
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = []
    async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=config.requests_topic) as client:
        for member, stop in enumerate(stops):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(run_ingest(config, stop=stop, ready=ready)))
            await asyncio.wait_for(ready.wait(), 60)
            for i in range(10):  # sent while the group rebalances
                await client.submit({"id": f"{config.group_id}-m{member}-{i}", "prompt": "hi",
                                     "max_tokens": 4})
        await assert_all_committed(kafka_bootstrap, config)
        work = await read_topic(kafka_bootstrap, config.work_topic, 20)
        # Redelivery across a rebalance may duplicate a work item (engines de-duplicate), never lose one.
        assert {decode_work_item(r.value).id for r in work} == {
            f"{config.group_id}-m{m}-{i}" for m in range(2) for i in range(10)}
    for stop in stops:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_submit_many_produces_every_request_once_in_one_batch(ingest, kafka_bootstrap):
    config, client = ingest
    run = unique_name("many")
    requests = [{"id": f"{run}-{i}", "prompt": "hi", "max_tokens": 2} for i in range(40)]
    requests[3]["reply_stream"] = f"{run}-own-stream"
    with pytest.raises(ValueError, match="string id"):
        await client.submit_many([{"id": f"{run}-never", "prompt": "x"}, {"prompt": "no id"}])
    streams = await client.submit_many(requests)
    assert streams[3] == f"{run}-own-stream" and streams[0] == f"lorafleet:out:{run}-0"
    await assert_all_committed(kafka_bootstrap, config)
    work = await read_topic(kafka_bootstrap, config.work_topic, 40)
    ids = sorted(decode_work_item(r.value).id for r in work if decode_work_item(r.value).id.startswith(run))
    assert ids == sorted(r["id"] for r in requests)  # each once; the refused call sent nothing
