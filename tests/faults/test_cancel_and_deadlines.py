"""Cancellation and deadlines (the reliability issue's row D11) through a real `lorafleet up`: a
client that gives up stops the generation, end to end, and a request past its deadline_ms ends
with `deadline_exceeded`, whether the deadline passes before ingest, in the engine's queue or
while it generates."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply
from tests.faults.up_stack import UpStack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LONG = 400  # tokens: generation runs for seconds on the CPU, long enough to be interrupted


@pytest.fixture(scope="module")
def ready(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cancel")
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), tmp / "adapters" / "t" / "a")
    up = UpStack(tmp, zoo.model("mha"), tmp / "adapters").start()
    yield up.ready
    up.stop()


def _long(rid: str, **extra) -> dict:
    return {"id": rid, "adapter": "t/a", "prompt": "the sea", "max_tokens": LONG, "ignore_eos": True, **extra}


async def _entries(client: LorafleetClient, rid: str) -> list:
    return [e async for e in client.replies(rid, timeout=120)]


async def test_cancel_while_generating_stops_the_request(ready):
    rid = unique_name("cancel")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_long(rid))
        entries = []
        async for entry in client.replies(rid, timeout=120):
            entries.append(entry)
            if len(entries) == 1:
                await client.cancel(rid)
        tokens = sum(len(e.token_ids) for e in entries if isinstance(e, TokenReply))
        assert isinstance(entries[-1], ErrorReply) and entries[-1].code == "cancelled", entries[-1]
        assert 0 < tokens < LONG
        stream_len = await client.redis.xlen(f"lorafleet:out:{rid}")
        await asyncio.sleep(1.0)
        assert await client.redis.xlen(f"lorafleet:out:{rid}") == stream_len  # nothing after the terminal entry


async def test_cancel_before_an_engine_takes_it(ready, tmp_path):
    rid = unique_name("precancel")
    (tmp_path / "ready.json").write_text(json.dumps(ready))  # `lorafleet cancel` as a user runs it
    done = subprocess.run([sys.executable, "-m", "lorafleet.cli", "cancel", "--ready-file", str(tmp_path / "ready.json"), rid],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_long(rid))
        entries = await _entries(client, rid)
    assert [type(e) for e in entries] == [ErrorReply] and entries[0].code == "cancelled"


async def test_deadline_already_passed_at_ingest(ready):
    rid = unique_name("late")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        await client.submit(_long(rid, deadline_ms=int(time.time() * 1000) - 1))
        entries = await _entries(client, rid)
    assert [type(e) for e in entries] == [ErrorReply] and entries[0].code == "deadline_exceeded"
    assert "deadline_ms" in entries[0].message


async def test_deadline_passing_while_generating(ready):
    rid = unique_name("expire")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        started = time.time()
        await client.submit(_long(rid, deadline_ms=int((started + 1.0) * 1000)))
        entries = await _entries(client, rid)
        tokens = sum(len(e.token_ids) for e in entries if isinstance(e, TokenReply))
        assert isinstance(entries[-1], ErrorReply) and entries[-1].code == "deadline_exceeded", (entries[-1], tokens)
        assert tokens < LONG
        # the engine is free again: a short request is served at once
        done = await client.generate({"id": unique_name("after"), "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert isinstance(done.terminal, DoneReply)


async def test_generate_cancels_what_it_stops_waiting_for(ready):
    rid = unique_name("gaveup")
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        with pytest.raises(TimeoutError):
            await client.generate(_long(rid, deadline_ms=int((time.time() + 60) * 1000)), timeout=0.5)
        entries = await _entries(client, rid)
    assert isinstance(entries[-1], ErrorReply) and entries[-1].code == "cancelled"
