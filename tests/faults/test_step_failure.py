"""A request that makes engine steps fail cannot take its engine down, nor crash-loop the engines
(the reliability issue's "engine step errors attributable to one request"). The fault is injected
into the real engine, in-process, against the real broker, redis-server and adapter store: every
step raises while a request whose id starts with "boom" is scheduled."""

from __future__ import annotations

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, ErrorReply
from lorafleet.engine.engine import LLMEngine
from tests.e2e.test_service_end_to_end import running_stack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def poisoned_steps(monkeypatch):
    step = LLMEngine.step

    def failing_step(self):
        if any(r.request_id.startswith("boom") for r in (*self.scheduler.running, *self.scheduler.waiting)):
            raise RuntimeError("injected step failure")
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", failing_step)


async def test_a_request_that_breaks_steps_ends_with_internal_error(poisoned_steps, kafka_bootstrap, redis_url, zoo,
                                                                     tmp_path, s3_server):
    root = (tmp_path / "root")
    root.mkdir()
    async with running_stack(kafka_bootstrap, redis_url, zoo.model("mha"), root.as_uri(), tmp_path / "shm",
                             s3_server.endpoint) as topics:
        async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topics["requests"]) as client:
            boom = unique_name("boom")
            await client.submit({"id": boom, "prompt": "hello", "max_tokens": 4})
            entries = [e async for e in client.replies(boom, timeout=120)]
            assert isinstance(entries[-1], ErrorReply) and entries[-1].code == "internal_error"
            assert "engine step serving the request failed (RuntimeError)" in entries[-1].message
            # the engine lives on, and the request is not served again (its offset was committed)
            for n in range(2):
                fine = await client.generate({"id": unique_name(f"fine{n}"), "prompt": "hi", "max_tokens": 3}, timeout=60)
                assert isinstance(fine.terminal, DoneReply)
            assert await client.redis.xlen(f"lorafleet:out:{boom}") == len(entries)
    # running_stack's exit asserts that the engine service returned without an exception
