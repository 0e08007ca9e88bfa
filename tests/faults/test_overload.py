"""Sustained overload (the reliability issue's row D12) through a real `lorafleet up`: an engine
that runs one sequence at a time gets more long requests than it can start within its queue
limit. Those that wait past the limit without a token end with `overloaded` (so a producer learns
to back off instead of waiting forever), the others are served whole, and every request gets
exactly one terminal entry."""

from __future__ import annotations

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply
from tests.faults.up_stack import UpStack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_requests_waiting_past_the_queue_limit_are_shed(zoo, tmp_path):
    up = UpStack(tmp_path, zoo.model("mha"), tmp_path,
                 env={"LORAFLEET_MAX_NUM_SEQS": "1", "LORAFLEET_ENGINE_MAX_QUEUE_S": "1.5"})
    try:
        ready = up.start().ready
        ids = [unique_name("load") for _ in range(6)]
        async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
            warm = await client.generate({"id": unique_name("warm"), "prompt": "hi", "max_tokens": 2}, timeout=60)
            assert isinstance(warm.terminal, DoneReply)  # the engine's first steps are slow: not under load
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
        assert {"done", "overloaded"} <= set(outcomes.values()), outcomes
        up.alive()
    finally:
        up.stop()
