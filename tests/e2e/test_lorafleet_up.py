"""`lorafleet up` as a user runs it: embedded broker and redis-server, the three services as
processes, the contract's ready JSON, a request answered, and a clean stop on SIGINT."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, TokenReply

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_up_serves_a_request_and_stops_cleanly(zoo, reference, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), root / "t" / "a")
    ready_file = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--model", str(zoo.model("mha")),
                             "--adapters", str(root), "--device", "cpu", "--ready-file", str(ready_file)],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "up.log", "wb"))
    try:
        deadline = time.monotonic() + 180
        while not ready_file.exists():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "lorafleet up was not ready in time"
            await asyncio.sleep(0.2)
        ready = json.loads(ready_file.read_text())
        assert set(ready) == {"kafka_bootstrap", "redis_url", "requests_topic", "dlq_topic", "metrics", "gateway"}
        assert set(ready["metrics"]) == {"adapter-store", "ingest", "gateway", "engine-0"}
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", ready["gateway"])
        assert ready["requests_topic"] == "lorafleet.requests" and ready["dlq_topic"] == "lorafleet.requests.dlq"
        printed = json.loads(proc.stdout.readline())
        assert printed == ready
        async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
            prompt = [5, 9, 14, 20, 33]
            await client.submit({"id": "up-1", "adapter": "t/a", "prompt_token_ids": prompt, "max_tokens": 6,
                                 "temperature": 0, "ignore_eos": True})
            entries = [e async for e in client.replies("up-1", timeout=120)]
        tokens = [t for e in entries if isinstance(e, TokenReply) for t in e.token_ids]
        assert tokens == reference.greedy(zoo.model("mha"), zoo.adapter("mha", "r4-pattern"), prompt, 6)
        assert isinstance(entries[-1], DoneReply)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
