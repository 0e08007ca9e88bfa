"""The probes' checks (services/health.py) against real things: a Tansu broker, a redis-server, and
a real `lorafleet adapter-store` process, which on SIGTERM must exit cleanly and take its adapter
files out of host memory."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.adapter_store.shm import FILE_SUFFIX
from lorafleet.common.embedded import free_port
from lorafleet.common.kafka import TopicSpec, ensure_topics
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.serving.config import EngineServiceConfig
from lorafleet.engine.serving.service import EngineService
from lorafleet.engine.serving.stall_watch import StallWatch
from lorafleet.formats.model_spec import ModelSpec
from lorafleet.health import heartbeat_problem, kafka_problem, keep_heartbeat, problems, redis_problem
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_heartbeat(tmp_path):
    ready = tmp_path / "ready"
    assert "missing" in heartbeat_problem(str(ready))
    ready.write_text("{}")
    assert heartbeat_problem(str(ready)) is None
    old = time.time() - 120
    os.utime(ready, (old, old))
    assert "stuck" in heartbeat_problem(str(ready))
    assert "no --ready-file" in heartbeat_problem(None)


def test_stall_watch_names_a_step_past_its_limit():
    now = [100.0]
    watch = StallWatch(300.0, clock=lambda: now[0])
    assert watch.problem() is None  # idle
    watch.started()
    now[0] += 300.0
    assert watch.problem() is None  # at the limit
    now[0] += 1.0
    assert "301s (limit 300s)" in watch.problem()
    watch.finished()
    assert watch.problem() is None


async def test_heartbeat_is_withheld_while_a_problem_is_named(tmp_path):
    """keep_heartbeat asks problem() once a beat: the file's age is read at each ask, so the whole
    history is known once the beat after the problem cleared has come (no sleeping to see nothing)."""
    ready = tmp_path / "ready"
    ready.write_text("{}")
    old = time.time() - 60
    os.utime(ready, (old, old))
    problem_beats, seen, after_clearing = 5, [], asyncio.Event()

    def problem() -> str | None:
        seen.append(ready.stat().st_mtime)  # what the previous beats left
        if len(seen) == problem_beats + 2:
            after_clearing.set()
        return "stuck step" if len(seen) <= problem_beats else None

    beat = asyncio.create_task(keep_heartbeat(ready, interval_s=0.01, problem=problem))
    try:
        await after_clearing.wait()
    finally:
        beat.cancel()
    # beats 1..5 named a problem and touched nothing; beat 6 found none and touched the file
    assert seen[:problem_beats + 1] == [old] * (problem_beats + 1), "touched while a problem was named"
    assert seen[problem_beats + 1] > old, "not touched once the problem cleared"


async def test_engine_service_times_each_step(tmp_path):
    """EngineService.step_once runs engine.step in a worker thread between watch.started() and
    watch.finished(): a step that blocks is named by the watch until it returns."""
    release = threading.Event()

    class BlockingEngine:
        def has_unfinished(self):
            return not release.is_set()

        def step(self):
            release.wait(30)
            return []

    cfg = EngineServiceConfig("127.0.0.1:1", "redis://127.0.0.1:1/0", "127.0.0.1:1", EngineConfig(model_dir="-"),
                              step_stall_s=0.05)
    service = EngineService(cfg, BlockingEngine(), writer=None, store=None)
    step = asyncio.create_task(service.step_once())
    deadline = time.monotonic() + 10
    while service.watch.problem() is None:
        assert time.monotonic() < deadline, "a blocked step was never named"
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(step, 10)
    assert service.watch.problem() is None


async def test_kafka_and_redis_checks(kafka_bootstrap, redis_url):
    topic = unique_name("health")
    await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    assert await kafka_problem(kafka_bootstrap, [topic]) is None
    missing = unique_name("absent")
    assert missing in await kafka_problem(kafka_bootstrap, [topic, missing])
    dead = f"127.0.0.1:{free_port()}"
    assert "unreachable" in await asyncio.wait_for(kafka_problem(dead, [topic]), 30)
    assert await redis_problem(redis_url) is None
    problem = await redis_problem(f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert "unreachable" in problem and "secret" not in problem


async def test_gateway_readiness_checks_its_requests_topic_and_redis(kafka_bootstrap, redis_url, tmp_path):
    """`lorafleet gateway --check ready` (the gateway's readiness and startup probes): the heartbeat,
    Kafka with the requests topic the gateway produces to, and Redis; nothing of the engines'."""
    ready = tmp_path / "gateway.ready"
    ready.write_text("{}")
    topic = unique_name("requests")
    await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    args = argparse.Namespace(ready_file=str(ready), kafka_bootstrap=kafka_bootstrap, redis_url=redis_url,
                              requests_topic=topic, work_topic=unique_name("absent-work"))
    assert await problems("gateway", "ready", args) == []  # no work topic, no store: not the gateway's
    no_topic = argparse.Namespace(**{**vars(args), "requests_topic": unique_name("absent")})
    (problem,) = await problems("gateway", "ready", no_topic)
    assert "lacks topics" in problem
    no_redis = argparse.Namespace(**{**vars(args), "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    (problem,) = await problems("gateway", "ready", no_redis)
    assert problem.startswith("Redis unreachable")
    ready.unlink()
    (problem,) = await problems("gateway", "live", args)
    assert problem == f"ready file {ready} is missing: the service has not finished starting"


def _cli(*argv: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorafleet.cli", *argv], **popen)


def _check(*argv: str) -> tuple[int, str]:
    """Run `lorafleet ... --check ...` as the kubelet would: a fresh process; (exit status, output)."""
    proc = _cli(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out.decode()


async def test_adapter_store_process_checks_and_drain(kafka_bootstrap, redis_url, zoo, tmp_path):
    model = zoo.model("mha")
    root = tmp_path / "root"
    shutil.copytree(zoo.adapter("mha", "r1-attn"), root / "team" / "r1")
    shm, ready = tmp_path / "shm", tmp_path / "store.ready"
    address = f"127.0.0.1:{free_port()}"
    store = _cli("adapter-store", "--model", str(model), "--adapters", root.as_uri(), "--address", address,
                 "--shm-dir", str(shm), "--ready-file", str(ready),
                 stdout=open(tmp_path / "store.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert store.poll() is None, (tmp_path / "store.log").read_text()
            assert time.monotonic() < deadline, "the store did not become ready"
            await asyncio.sleep(0.1)
        code, out = await asyncio.to_thread(_check, "adapter-store", "--check", "ready", "--address", address,
                                            "--ready-file", str(ready))
        assert (code, out.strip()) == (0, "ok: adapter-store ready")
        # The engine's readiness: broker, Redis and this node's store, all real (checked in-process).
        topic = unique_name("work")
        await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
        engine_args = argparse.Namespace(ready_file=str(ready), kafka_bootstrap=kafka_bootstrap, redis_url=redis_url,
                                         work_topic=topic, store_address=address)
        assert await problems("engine", "ready", engine_args) == []
        no_store = argparse.Namespace(**{**vars(engine_args), "store_address": f"127.0.0.1:{free_port()}"})
        (problem,) = await problems("engine", "ready", no_store)
        assert problem.startswith("adapter store at")

        client = AdapterStoreClient(address, ModelSpec.from_pretrained(model))
        await client.get("team/r1")
        await client.close()
        assert [p for p in shm.iterdir() if p.name.endswith(FILE_SUFFIX)], "the adapter should be in host memory"

        store.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(store.wait) == 0, "SIGTERM must stop the store cleanly"
        assert not [p for p in shm.iterdir() if p.name.endswith(FILE_SUFFIX)], "adapter files left in host memory"
        code, out = await asyncio.to_thread(_check, "adapter-store", "--check", "ready", "--address", address,
                                            "--ready-file", str(ready))
        assert code == 1 and "adapter store at" in out
    finally:
        if store.poll() is None:
            store.kill()
            store.wait()
