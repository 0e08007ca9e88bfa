"""Topic creation, embedded processes, the client's stream reading, and ingest's SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common import embedded
from lorafleet.common.kafka import TopicSpec, ensure_topics, make_producer, partition_count
from lorafleet.common.messages import done_entry, error_entry, token_entry
from lorafleet.common.replies import ReplyWriter
from tests.infra_fixtures import unique_name
from tests.service.kafka_helpers import read_topic
from tests.service.test_ingest import assert_all_committed, make_config


async def test_ensure_topics_is_idempotent_and_race_safe(kafka_bootstrap):
    a, b = unique_name("topic-a"), unique_name("topic-b")
    specs = [TopicSpec(a, 3), TopicSpec(b, 1)]
    await asyncio.gather(ensure_topics(kafka_bootstrap, specs), ensure_topics(kafka_bootstrap, specs))
    await ensure_topics(kafka_bootstrap, [TopicSpec(a, 7)])  # exists: left as it is
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        assert await partition_count(producer, a) == 3
        assert await partition_count(producer, b) == 1
    finally:
        await producer.stop()


def test_missing_redis_server_names_the_install_command(monkeypatch):
    monkeypatch.setenv("LORAFLEET_REDIS_SERVER_BIN", "/nonexistent/redis-server")
    with pytest.raises(embedded.EmbeddedStartError, match="apt-get install redis-server"):
        embedded.start_redis()


def test_embedded_processes_stop_cleanly(tmp_path):
    broker = embedded.start_broker(log_dir=tmp_path)
    server = embedded.start_redis(log_dir=tmp_path)
    broker.stop()
    server.stop()
    assert broker.process.returncode is not None and server.process.returncode is not None
    assert (tmp_path / "tansu.log").exists() and (tmp_path / "redis.log").exists()
    broker.stop()  # idempotent


async def test_client_reads_a_stream_to_its_terminal_entry(kafka_bootstrap, redis_url):
    async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=unique_name("req")) as client:
        writer = ReplyWriter(client.redis)
        rid = unique_name("gen")
        stream = f"lorafleet:out:{rid}"

        async def engine() -> None:  # tokens arrive while the client is blocked in XREAD
            for i, piece in enumerate(["He", "llo", ""]):
                await asyncio.sleep(0.05)
                await writer.publish([(stream, rid, token_entry(piece, [10 + i], index=i))])
            await writer.publish([(stream, rid, done_entry("stop", 2, 3)),
                                  (stream, rid, token_entry("late", [99], index=3))])

        task = asyncio.create_task(engine())
        entries = [e async for e in client.replies(rid, timeout=10)]
        await task
        assert [getattr(e, "text", None) for e in entries] == ["He", "llo", "", None]
        assert entries[-1] == done_entry("stop", 2, 3)
        with pytest.raises(TimeoutError):
            async for _ in client.replies(stream="lorafleet:out:never", timeout=0.3):
                pass
        with pytest.raises(ValueError):
            await client.replies().__anext__()  # needs exactly one of id / stream


async def test_client_generate_collects_text_and_ids(kafka_bootstrap, redis_url):
    topic = unique_name("req")
    await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topic) as client:
        rid = unique_name("gen")
        writer = ReplyWriter(client.redis)
        await writer.publish([(f"lorafleet:out:{rid}", rid, token_entry("ab", [1, 2], index=0)),
                              (f"lorafleet:out:{rid}", rid, error_entry("adapter_not_found", "gone."))])
        before = time.time()
        text, token_ids, terminal = await client.generate({"id": rid, "prompt": "x"}, timeout=10)
        assert (text, token_ids, terminal) == ("ab", [1, 2], error_entry("adapter_not_found", "gone."))
        sent = json.loads((await read_topic(kafka_bootstrap, topic, 1))[0].value)
        # generate() gives the request a deadline `timeout` away (contract extension deadline_ms)
        assert sent.pop("deadline_ms") / 1000 == pytest.approx(before + 10, abs=2)
        assert sent == {"id": rid, "prompt": "x"}


_RUN_INGEST = """
import asyncio, json, sys
from pathlib import Path
from lorafleet.common.logging import configure_logging
from lorafleet.ingest.config import IngestConfig
from lorafleet.ingest.service import run_ingest
configure_logging("ingest", "info")
fields = json.loads(sys.argv[1]); fields["model_dir"] = Path(fields["model_dir"])
asyncio.run(run_ingest(IngestConfig(**fields)))
"""


async def test_sigterm_drains_and_exits(kafka_bootstrap, redis_url, model_dir):
    config = make_config(kafka_bootstrap, redis_url, model_dir)
    fields = {k: str(v) if k == "model_dir" else v for k, v in config.__dict__.items()}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_INGEST, json.dumps(fields),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[bytes] = []

    async def wait_for_line(text: bytes) -> None:
        while not any(text in line for line in lines):
            line = await process.stdout.readline()
            assert line, b"".join(lines).decode()[-3000:]
            lines.append(line)

    try:
        await asyncio.wait_for(wait_for_line(b"ingest ready"), 60)
        async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=config.requests_topic) as client:
            for i in range(5):
                await client.submit({"id": f"{config.group_id}-{i}", "prompt": "hi", "max_tokens": 2})
            await read_topic(kafka_bootstrap, config.work_topic, 5, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), config.drain_timeout_s + 10)
        output = b"".join(lines) + rest
        assert process.returncode == 0, output.decode()[-3000:]
        assert b"ingest stopped" in output
        await assert_all_committed(kafka_bootstrap, config)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
