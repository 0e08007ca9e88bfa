"""Ingest's delivery guarantee under faults: a request message is committed only once its outcome
(work item, error entry or dead letter) is durable, so ingest killed mid-batch while Redis is away
or stalled, or while the broker refuses a produce, loses nothing: a new ingest handles the batch
again. Real `lorafleet ingest` processes, a real redis-server to kill or stall, and a real Tansu
broker with a schema registry: a topic's JSON schema makes the broker refuse records
(INVALID_RECORD) as a broker with validation does, and removing the file lets them in again.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import msgspec
import pytest
import redis.asyncio as aioredis

from lorafleet.common.embedded import start_broker, start_redis
from lorafleet.common.messages import ErrorReply, decode_work_item, parse_entry
from lorafleet.ingest.config import IngestConfig
from lorafleet.ingest.routing import choose_partition
from tests.faults.up_stack import Restartable
from tests.infra_fixtures import unique_name
from tests.service.ingest_process import IngestProcess
from tests.service.kafka_helpers import group_offsets, produce_batch, read_topic, wait_all_committed
from tests.service.test_ingest import make_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
# Redis calls time out after 1 s and are retried for 2 s before ingest backs off and handles the
# batch again: ingest cycles through its outage path within the test's few seconds.
FAST_REDIS = {"LORAFLEET_REDIS_TIMEOUT_S": "1", "LORAFLEET_REDIS_RETRY_S": "2"}
UNWELCOME = "unwelcome"  # a request id holding this word: the work topic's schema refuses its work item
UNREADABLE = b"\x00 not json"


@pytest.fixture(scope="module")
def schema_broker(tmp_path_factory):
    """(bootstrap, schema folder) of a Tansu broker validating records against <topic>.json there."""
    tmp = tmp_path_factory.mktemp("schema-broker")
    (tmp / "schemas").mkdir()
    broker = start_broker(tmp, schema_registry=tmp / "schemas")
    yield broker.bootstrap, tmp / "schemas"
    broker.stop()


@pytest.fixture
def redis(tmp_path):
    server = Restartable(lambda port: start_redis(tmp_path, port=port))  # no persistence
    yield server
    server.resume()  # a test that failed while Redis was stalled must not leave it stopped
    server.stop()


def _config(bootstrap: str, redis: Restartable, model_dir, schemas) -> IngestConfig:
    config = replace(make_config(bootstrap, f"redis://127.0.0.1:{redis.port}/0", model_dir),
                     requests_partitions=1, session_timeout_ms=3000)
    (schemas / f"{config.work_topic}.json").write_text(json.dumps({"type": "object", "properties": {
        "value": {"type": "object", "properties": {"id": {"type": "string", "not": {"pattern": UNWELCOME}}}}}}))
    return config


def _welcome_beside(unwelcome: str, config: IngestConfig) -> str:
    """A good request id routed to another work partition than `unwelcome`: the broker refuses a
    produce batch as a whole, so a work item batched with the refused one would be refused too."""
    home = choose_partition(unwelcome, None, config.work_partitions)
    for n in itertools.count():
        rid = f"{unwelcome.replace(UNWELCOME, 'welcome')}-{n}"
        if choose_partition(rid, None, config.work_partitions) != home:
            return rid


def _request(rid: str, **fields) -> bytes:
    return msgspec.json.encode({"id": rid, "prompt": "hi", "max_tokens": 4, **fields})


async def _only_error(redis_url: str, rid: str, code: str, words: str) -> None:
    """The request's whole reply stream (XRANGE) is one error entry: `code`, `words` in its message."""
    client = aioredis.from_url(redis_url)
    try:
        entries = [parse_entry(fields) for _, fields in await client.xrange(f"lorafleet:out:{rid}")]
    finally:
        await client.aclose()
    assert len(entries) == 1, f"{rid}: expected one error entry, its stream holds {entries}"
    assert isinstance(entries[0], ErrorReply) and entries[0].code == code and words in entries[0].message, entries


async def _all_committed(config: IngestConfig) -> bool:
    committed, ends = await group_offsets(config.kafka_bootstrap, config.group_id, config.requests_topic)
    return committed == ends


async def _assert_nothing_committed(config: IngestConfig, why: str) -> None:
    committed, ends = await group_offsets(config.kafka_bootstrap, config.group_id, config.requests_topic)
    assert committed == dict.fromkeys(ends, 0), f"ingest committed {committed} of {ends} {why}"


@pytest.mark.parametrize("fault", ["killed", "stalled"], ids=["redis-killed", "redis-stalled"])
async def test_ingest_killed_mid_batch_while_redis_is_away_loses_nothing(schema_broker, redis, model_dir, tmp_path,
                                                                         fault):
    """One batch holding every outcome: two invalid requests (error entries), a good one (work
    item), one whose work item the broker refuses (an error entry instead) and an unreadable
    message (dead letter). Redis goes away (killed: writes fail at once; stalled: they time out)
    while ingest holds the batch; ingest is SIGKILLed; a new ingest of the same group serves it."""
    bootstrap, schemas = schema_broker
    config = _config(bootstrap, redis, model_dir, schemas)
    run = unique_name("mid-batch")
    invalid, unwelcome = [f"{run}-invalid-{n}" for n in (1, 2)], f"{run}-{UNWELCOME}"
    good = _welcome_beside(unwelcome, config)
    first = await IngestProcess(config, tmp_path, "first", FAST_REDIS).start()
    second = IngestProcess(config, tmp_path, "second", FAST_REDIS)
    try:
        redis.kill() if fault == "killed" else redis.pause()
        batch = [_request(rid, max_tokens=0) for rid in invalid] + [_request(good), _request(unwelcome), UNREADABLE]
        await produce_batch(bootstrap, config.requests_topic, batch)
        await first.wait_consumed(len(batch))  # ingest holds the batch: its error entries cannot be written
        await _assert_nothing_committed(config, "while the batch's error entries could not be written to Redis")
        first.kill()
        redis.start() if fault == "killed" else redis.resume()
        await second.start()
        await wait_all_committed(bootstrap, config.group_id, config.requests_topic)
        second.alive()
    finally:
        first.stop()
        second.stop()
    for rid in invalid:
        await _only_error(config.redis_url, rid, "invalid_request", "max_tokens")
    await _only_error(config.redis_url, unwelcome, "internal_error", "the broker refused")
    work = {decode_work_item(r.value).id for r in await read_topic(bootstrap, config.work_topic, count=0)}
    assert work == {good}, f"work items of {work}"  # the refused one never got in
    letters = await read_topic(bootstrap, config.dlq_topic, count=0)
    assert letters and all(r.value == UNREADABLE for r in letters), f"dead letters: {letters}"


async def test_a_dead_letter_and_a_work_item_the_broker_refuses_are_answered_before_the_commit(
        schema_broker, redis, model_dir, tmp_path):
    """The dead-letter topic admits only JSON objects: the unreadable message's own bytes are
    refused, so its dead letter is its reason alone (a JSON object); a work item refused for good
    becomes its request's error entry. Both are written before the batch is committed."""
    bootstrap, schemas = schema_broker
    config = _config(bootstrap, redis, model_dir, schemas)
    (schemas / f"{config.dlq_topic}.json").write_text(json.dumps({"type": "object", "properties": {
        "value": {"type": "object"}}}))
    unwelcome = unique_name(UNWELCOME)
    good = _welcome_beside(unwelcome, config)
    ingest = await IngestProcess(config, tmp_path, "ingest").start()
    try:
        await produce_batch(bootstrap, config.requests_topic, [UNREADABLE, _request(unwelcome), _request(good)])
        await wait_all_committed(bootstrap, config.group_id, config.requests_topic)
        ingest.alive()
    finally:
        ingest.stop()
    letters = await read_topic(bootstrap, config.dlq_topic, count=0)
    assert len(letters) == 1, f"expected the reason-only dead letter, the dead-letter topic holds {letters}"
    letter, headers = letters[0], dict(letters[0].headers)
    assert b"not valid UTF-8 JSON" in headers["reason"]
    assert json.loads(letter.value) == {"reason": headers["reason"].decode(), "refused": headers["refused"].decode()}
    assert headers["refused"] and headers["offset"] == b"0" and letter.key is None
    await _only_error(config.redis_url, unwelcome, "internal_error", "the broker refused")
    assert [decode_work_item(r.value).id for r in await read_topic(bootstrap, config.work_topic, count=0)] == [good]


async def test_a_dead_letter_topic_that_takes_nothing_holds_the_batch_until_it_does(schema_broker, redis, model_dir,
                                                                                     tmp_path):
    """The dead-letter topic refuses every record (its schema wants a field no dead letter has):
    the message is not committed, and ingest handles its batch again until the topic takes the
    dead letter (the schema removed); then it is dead-lettered whole and committed."""
    bootstrap, schemas = schema_broker
    config = _config(bootstrap, redis, model_dir, schemas)
    dlq_schema = schemas / f"{config.dlq_topic}.json"
    dlq_schema.write_text(json.dumps({"type": "object", "properties": {
        "value": {"type": "object", "required": ["a field no dead letter has"]}}}))
    ingest = await IngestProcess(config, tmp_path, "ingest").start()
    try:
        await produce_batch(bootstrap, config.requests_topic, [UNREADABLE])
        # handled, refused, handled again (or, were the refusal missed, committed)
        await ingest.wait_consumed(2, unless=lambda: _all_committed(config))
        await _assert_nothing_committed(config, "while the dead-letter topic refused the message's dead letter")
        assert await read_topic(bootstrap, config.dlq_topic, count=0) == []
        dlq_schema.unlink()
        await wait_all_committed(bootstrap, config.group_id, config.requests_topic)
        ingest.alive()
    finally:
        ingest.stop()
    letters = await read_topic(bootstrap, config.dlq_topic, count=0)
    assert letters and all(r.value == UNREADABLE and r.key == b"k" for r in letters), f"dead letters: {letters}"
