"""Sustained overload (the reliability issue's row D12) through a real `lorafleet up`: an engine
that runs one sequence at a time gets more long requests than it can start within its queue
limit. Those that wait past the limit without a token end with `overloaded` (so a producer learns
to back off instead of waiting forever), the others are served whole, and every request gets
exactly one terminal entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_requests_waiting_past_the_queue_limit_are_shed(zoo, tmp_path):
    ready_file = tmp_path / "ready.json"
    env = dict(os.environ, LORAFLEET_MAX_NUM_SEQS="1", LORAFLEET_ENGINE_MAX_QUEUE_S="1.5")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--model", str(zoo.model("mha")),
                             "--adapters", str(tmp_path), "--device", "cpu", "--ready-file", str(ready_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "up.log", "wb"))
    try:
        deadline = time.monotonic() + 180
        while not ready_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        ready = json.loads(ready_file.read_text())
        ids = [unique_name("load") for _ in range(6)]
        async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
            for rid in ids:
                await client.submit({"id": rid, "prompt": "the sea", "max_tokens": 300, "ignore_eos": True})
            outcomes = {}
            for rid in ids:
                entries = [e async for e in client.replies(rid, timeout=120)]
                terminal = entries[-1]
                tokens = sum(len(e.token_ids) for e in entries if isinstance(e, TokenReply))
                assert sum(not isinstance(e, TokenReply) for e in entries) == 1
                if isinstance(terminal, DoneReply):
                    assert tokens == 300
                    outcomes[rid] = "done"
                else:
                    assert isinstance(terminal, ErrorReply) and terminal.code == "overloaded", terminal
                    assert tokens == 0 and "send it again later" in terminal.message
                    outcomes[rid] = "overloaded"
        assert outcomes[ids[0]] == "done" and "overloaded" in outcomes.values(), outcomes
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
