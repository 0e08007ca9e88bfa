"""An engine killed mid-generation: a restarted engine serves what it had not committed, none lost,
no token twice, one terminal entry each (each stream read whole once the second engine has
committed every work item). The engines are real processes (`lorafleet engine`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply
from lorafleet.common.signals import stop_subprocess
from tests.infra_fixtures import unique_name
from tests.reply_streams import assert_served_once, whole_stream
from tests.service.kafka_helpers import wait_all_committed

from .test_service_end_to_end import _adapter_root, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MAX_TOKENS = 120


def _start_engine(name: str, kafka_bootstrap: str, redis_url: str, model_dir: Path, topics: dict, group: str,
                  store_address: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, LORAFLEET_KAFKA_SESSION_TIMEOUT_MS="6000", **(env or {}))
    cmd = [sys.executable, "-m", "lorafleet.cli", "engine", "--kafka-bootstrap", kafka_bootstrap, "--redis-url", redis_url,
           "--model", str(model_dir), "--store-address", store_address, "--work-topic", topics["work"],
           "--work-partitions", "4", "--group-id", group, "--engine-id", name, "--device", "cpu", "--pool-pages", "128",
           "--max-batched-tokens", "64", "--ready-file", str(log.with_suffix(".ready"))]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"engine exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "engine not ready in time"
        time.sleep(0.2)


async def test_killed_engine_requests_are_served_by_a_restarted_one(kafka_bootstrap, redis_url, zoo, reference, tmp_path, s3_server):
    model_dir = zoo.model("mha")
    root = _adapter_root(zoo, tmp_path, "file", s3_server)
    async with running_stack(kafka_bootstrap, redis_url, model_dir, root, tmp_path / "shm", s3_server.endpoint,
                             with_engine=False) as topics:
        group = unique_name("engines")
        first = _start_engine("first", kafka_bootstrap, redis_url, model_dir, topics, group, topics["store"], tmp_path / "first.log")
        second = None
        try:
            await asyncio.to_thread(_wait_file, tmp_path / "first.ready", first)
            async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topics["requests"]) as client:
                run = unique_name("kill")
                jobs = {}
                for i, adapter in enumerate((None, "r1-attn", "r8-all-rslora", "r4-pattern", None, "r1-attn")):
                    rid, prompt = f"{run}-{i}", [(13 * i + 5 * j) % 500 + 4 for j in range(6 + i)]
                    jobs[rid] = (adapter, prompt)
                    await client.submit({"id": rid, "adapter": adapter and f"team/{adapter}", "prompt_token_ids": prompt,
                                         "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
                # Kill the engine as soon as generation is under way (some tokens published, none finished).
                deadline = time.monotonic() + 120
                while True:
                    lengths = [await client.redis.xlen(f"lorafleet:out:{rid}") for rid in jobs]
                    if max(lengths) >= 3:
                        break
                    assert time.monotonic() < deadline, "the first engine produced nothing"
                    await asyncio.sleep(0.05)
                first.send_signal(signal.SIGKILL)
                first.wait()
                assert min(lengths) < MAX_TOKENS + 1, "killed too late: every request had finished"
                second = _start_engine("second", kafka_bootstrap, redis_url, model_dir, topics, group, topics["store"], tmp_path / "second.log")
                for rid in jobs:
                    [e async for e in client.replies(rid, timeout=180)]  # until its terminal entry
                # The second engine has finished with every work item: the streams are complete.
                await wait_all_committed(kafka_bootstrap, group, topics["work"])
                for rid, (adapter, prompt) in jobs.items():
                    entries = await whole_stream(client.redis, rid)
                    tokens = assert_served_once(entries, rid)
                    want = reference.greedy(model_dir, adapter and zoo.adapter("mha", adapter), prompt, MAX_TOKENS)
                    assert tokens == want, rid
                    assert isinstance(entries[-1], DoneReply), entries[-1]
        finally:
            for proc in (first, second):
                if proc is not None:
                    stop_subprocess(proc, signal.SIGTERM, 30)
