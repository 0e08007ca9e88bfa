"""The service end to end: aiokafka in, Redis streams out, adapters from file:// and s3:// roots.

Real Tansu broker, real redis-server, real S3 HTTP server (moto), all started by fixtures; the
adapter store, ingest and the engine run in this process as asyncio tasks.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from lorafleet.adapter_store.config import AdapterStoreConfig
from lorafleet.adapter_store.server import run_adapter_store
from lorafleet.client import LorafleetClient
from lorafleet.common.embedded import free_port
from lorafleet.common.messages import DoneReply, ErrorReply
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.serving.config import EngineServiceConfig
from lorafleet.engine.serving.serve import run_engine_service
from lorafleet.ingest.config import IngestConfig
from lorafleet.ingest.service import run_ingest
from tests.infra_fixtures import unique_name
from tests.reply_streams import assert_served_once, whole_stream
from tests.service.kafka_helpers import read_topic, wait_all_committed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
GOOD_ADAPTERS = ("r1-attn", "r8-all-rslora", "r4-pattern")
MAX_TOKENS = 8


def _adapter_root(zoo, tmp_path: Path, kind: str, s3_server) -> str:
    """A root holding the good adapters under nested ids, plus one broken adapter."""
    local = tmp_path / "root"
    for name in GOOD_ADAPTERS:
        shutil.copytree(zoo.adapter("mha", name), local / "team" / name)
    broken = local / "team" / "broken"
    shutil.copytree(zoo.adapter("mha", "r1-attn"), broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["r"] = 3  # the tensors are rank 1: shapes no longer match the config
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    if kind == "file":
        return local.as_uri()
    bucket = s3_server.create_bucket(unique_name("adapters").lower())
    for adapter_dir in sorted((local / "team").iterdir()):
        s3_server.upload_folder(adapter_dir, bucket, f"v1/team/{adapter_dir.name}")
    return f"s3://{bucket}/v1"


@asynccontextmanager
async def running_stack(kafka_bootstrap, redis_url, model_dir: Path, root: str, shm: Path, s3_endpoint: str,
                        with_engine: bool = True):
    topics = {k: unique_name(k) for k in ("requests", "dlq", "work")}
    store_addr = f"127.0.0.1:{free_port()}"
    env = {"LORAFLEET_S3_ENDPOINT": s3_endpoint, "LORAFLEET_S3_ALLOW_HTTP": "1"}
    store_cfg = AdapterStoreConfig.from_env_and_args(model_dir=model_dir, adapters_root=root, address=store_addr,
                                                     shm_dir=shm, environ=env)
    groups = {"ingest_group": unique_name("ingest"), "engine_group": unique_name("engines")}
    ingest_cfg = IngestConfig(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, model_dir=model_dir,
                              requests_topic=topics["requests"], dlq_topic=topics["dlq"], work_topic=topics["work"],
                              work_partitions=4, group_id=groups["ingest_group"], drain_timeout_s=10)
    engine_cfg = EngineServiceConfig(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, store_address=store_addr,
                                     engine=EngineConfig(model_dir=str(model_dir), num_pages=96, max_batched_tokens=64),
                                     work_topic=topics["work"], work_partitions=4, group_id=groups["engine_group"],
                                     engine_id="e2e", drain_timeout_s=10)
    stop = asyncio.Event()
    store_ready = asyncio.Event()
    tasks = [asyncio.create_task(run_adapter_store(store_cfg, stop=stop, on_ready=lambda _a: store_ready.set()))]
    await asyncio.wait_for(store_ready.wait(), 60)
    ready = [asyncio.Event()]
    tasks.append(asyncio.create_task(run_ingest(ingest_cfg, stop=stop, ready=ready[0])))
    if with_engine:
        ready.append(asyncio.Event())
        tasks.append(asyncio.create_task(run_engine_service(engine_cfg, stop=stop, ready=ready[1])))
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 120)
        yield {**topics, **groups, "store": store_addr}
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors


async def _entries(client: LorafleetClient, request_id: str) -> list:
    return [e async for e in client.replies(request_id, timeout=120)]


@pytest.mark.parametrize("root_kind", ["file", "s3"])
async def test_requests_over_adapters_stream_hf_peft_tokens(kafka_bootstrap, redis_url, zoo, reference, tmp_path, s3_server, root_kind):
    model_dir = zoo.model("mha")
    root = _adapter_root(zoo, tmp_path, root_kind, s3_server)
    async with running_stack(kafka_bootstrap, redis_url, model_dir, root, tmp_path / "shm", s3_server.endpoint) as topics:
        async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topics["requests"]) as client:
            run = unique_name(root_kind)
            good = {}
            for i, adapter in enumerate((None, *GOOD_ADAPTERS, None, GOOD_ADAPTERS[1])):
                prompt = [(11 * i + 7 * j) % 500 + 4 for j in range(5 + 4 * i)]
                rid = f"{run}-good-{i}"
                good[rid] = (adapter, prompt)
                await client.submit({"id": rid, "adapter": None if adapter is None else f"team/{adapter}",
                                     "prompt_token_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                     "ignore_eos": True})
                # Bad requests interleaved with the good ones: each gets exactly one error entry.
                await client.submit({"id": f"{run}-bad-{i}", "adapter": "team/missing", "prompt": "hi"})
            bad = {
                f"{run}-invalid": ({"temperature": -1, "prompt": "x"}, "invalid_request"),
                f"{run}-toolong": ({"prompt_token_ids": [5] * 500, "max_tokens": 100}, "prompt_too_long"),
                f"{run}-broken": ({"adapter": "team/broken", "prompt": "x"}, "invalid_adapter"),
                f"{run}-badid": ({"adapter": "team/../etc", "prompt": "x"}, "invalid_request"),
            }
            for rid, (fields, _code) in bad.items():
                await client.submit({"id": rid, **fields})
            await client.submit_raw(b"not json at all")

            # Every request answered, and ingest and the engine done with every message: the
            # streams, read whole, are final.
            for rid in [*good, *(f"{run}-bad-{i}" for i in range(len(good))), *bad]:
                await _entries(client, rid)
            await wait_all_committed(kafka_bootstrap, topics["ingest_group"], topics["requests"])
            await wait_all_committed(kafka_bootstrap, topics["engine_group"], topics["work"])
            for rid, (adapter, prompt) in good.items():
                entries = await whole_stream(client.redis, rid)
                adapter_dir = None if adapter is None else zoo.adapter("mha", adapter)
                want = reference.greedy(model_dir, adapter_dir, prompt, MAX_TOKENS)
                assert assert_served_once(entries, rid) == want, rid
                assert isinstance(entries[-1], DoneReply), entries[-1]
                assert entries[-1].finish_reason == "length" and int(entries[-1].completion_tokens) == MAX_TOKENS
            for i in range(len(good)):
                entries = await whole_stream(client.redis, f"{run}-bad-{i}")
                assert len(entries) == 1 and entries[0].code == "adapter_not_found", entries
            for rid, (_fields, code) in bad.items():
                entries = await whole_stream(client.redis, rid)
                assert len(entries) == 1 and isinstance(entries[0], ErrorReply), (rid, entries)
                assert entries[0].code == code, (rid, entries[0].message)


async def test_a_request_delivered_again_after_it_finished_is_served_once(kafka_bootstrap, redis_url, zoo, reference,
                                                                         tmp_path, s3_server):
    """At-least-once delivery: a good request sent twice back to back (the second joins the first
    while it runs) and once more after its `done` entry, an invalid one again after its `error`
    entry. Each redelivery reaches ingest and, for the good one, the engine (a new work item);
    each stream read whole is still one clean run: every token once in order, one terminal entry."""
    model_dir = zoo.model("mha")
    root = _adapter_root(zoo, tmp_path, "file", s3_server)
    async with running_stack(kafka_bootstrap, redis_url, model_dir, root, tmp_path / "shm",
                             s3_server.endpoint) as topics:
        async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=topics["requests"]) as client:
            rid, invalid, later = unique_name("again"), unique_name("again-invalid"), unique_name("again-later")
            prompt = [4, 5, 6, 7]
            request = {"id": rid, "adapter": "team/r8-all-rslora", "prompt_token_ids": prompt,
                       "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            await client.submit(request)
            await client.submit(request)
            await client.submit({"id": invalid, "prompt": "x", "max_tokens": 0})
            for finished in (rid, invalid):
                await _entries(client, finished)  # its terminal entry is written
            await client.submit(request)
            await client.submit({"id": invalid, "prompt": "x", "max_tokens": 0})
            # Ingest has handled every delivery (and routed each good one to the engines)...
            await wait_all_committed(kafka_bootstrap, topics["ingest_group"], topics["requests"])
            # ...and the engine every work item: one more request of the adapter (its work partition,
            # after the redelivered item) finishes, and the engine commits the whole work topic.
            await client.submit({**request, "id": later})
            await _entries(client, later)
            await wait_all_committed(kafka_bootstrap, topics["engine_group"], topics["work"])
            work = await read_topic(kafka_bootstrap, topics["work"], count=0)
            assert sum(r.key == rid.encode() for r in work) >= 2, "the redelivery never reached the engine"
            entries = await whole_stream(client.redis, rid)
            tokens = assert_served_once(entries, rid)
            assert tokens == reference.greedy(model_dir, zoo.adapter("mha", "r8-all-rslora"), prompt, MAX_TOKENS)
            assert isinstance(entries[-1], DoneReply) and int(entries[-1].completion_tokens) == MAX_TOKENS
            rejected = await whole_stream(client.redis, invalid)
            assert len(rejected) == 1 and isinstance(rejected[0], ErrorReply), f"{invalid}: {rejected}"
