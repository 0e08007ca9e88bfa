"""Redis stalls (stops answering, keeps its connections: a long fork, a paused VM, a network
hiccup) for longer than the engine's Redis timeout while the engine publishes a step's tokens:
the engine's publish times out and is sent again, and Redis, once it answers, runs both the
stalled publish and its retry. The reply writer's script drops the second copy, so the stream
read whole still holds every token once, in order, and one `done`. A real `lorafleet engine`
process, a real redis-server stalled with SIGSTOP."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.embedded import start_redis
from lorafleet.common.messages import DoneReply
from lorafleet.common.signals import stop_subprocess
from tests.faults.up_stack import Restartable
from tests.infra_fixtures import unique_name
from tests.reply_streams import assert_served_once, whole_stream
from tests.service.kafka_helpers import POLL_S

from .test_engine_restart import _start_engine, _wait_file
from .test_service_end_to_end import _adapter_root, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MAX_TOKENS = 400  # still generating when Redis stalls a few tokens in


async def _until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(POLL_S)


async def test_a_publish_retried_through_a_redis_stall_writes_each_token_once(kafka_bootstrap, zoo, tmp_path,
                                                                               s3_server):
    redis = Restartable(lambda port: start_redis(tmp_path, port=port))
    redis_url = f"redis://127.0.0.1:{redis.port}/0"
    model_dir = zoo.model("mha")
    root = _adapter_root(zoo, tmp_path, "file", s3_server)
    log = tmp_path / "engine.log"
    engine = None
    try:
        async with running_stack(kafka_bootstrap, redis_url, model_dir, root, tmp_path / "shm", s3_server.endpoint,
                                 with_engine=False) as topics:
            # Every Redis call of the engine times out after 1 s and is retried (for 30 s).
            engine = _start_engine("stall", kafka_bootstrap, redis_url, model_dir, topics, unique_name("engines"),
                                   topics["store"], log, env={"LORAFLEET_REDIS_TIMEOUT_S": "1"})
            await asyncio.to_thread(_wait_file, log.with_suffix(".ready"), engine)
            async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topics["requests"]) as client:
                rid = unique_name("stall")
                await client.submit({"id": rid, "adapter": "team/r4-pattern", "prompt_token_ids": [4, 5, 6],
                                     "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})

                async def streaming() -> bool:
                    return await client.redis.xlen(f"lorafleet:out:{rid}") >= 3

                async def publish_retried() -> bool:
                    return any('"redis error, retrying"' in line and '"publish"' in line
                               for line in log.read_text(errors="replace").splitlines())

                await _until(streaming, "the engine streaming tokens")
                redis.pause()
                try:
                    await _until(publish_retried, "the engine retrying a publish that timed out")
                finally:
                    redis.resume()
                [e async for e in client.replies(rid, timeout=120)]  # until its terminal entry
                entries = await whole_stream(client.redis, rid)
        tokens = assert_served_once(entries, rid)
        assert len(tokens) == MAX_TOKENS and isinstance(entries[-1], DoneReply), entries[-1]
        assert engine.poll() is None, f"the engine exited with {engine.returncode}"
    finally:
        if engine is not None:
            stop_subprocess(engine, signal.SIGTERM, 30)
        redis.resume()
        redis.stop()
