"""Faults on a real network between hosts (bench/netbed): broker, Redis, S3 + adapter store,
ingest and three engines each in a network namespace, reaching each other only by the bed's
addresses. Every request, whatever the fault, ends with all its tokens once, equal to the HF +
PEFT reference, and exactly one terminal entry, last (read whole with XRANGE once it is done).

    latency      every engine's traffic to Redis and to the broker through relays adding
                 20 ± 10 ms each way (this kernel has no netem: bench/netbed/relay.py)
    cut off      an engine host loses the network mid-generation and comes back: its partitions
                 move to the others, which serve its requests; what it writes late is skipped
    redis        Redis unreachable from one engine only, for longer than its writer's retries
    broker       the broker unreachable from the ingest for a while
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import time

import pytest

from lorafleet.bench.netbed.fleet import NetFleet, NetFleetSetup
from lorafleet.bench.netbed.network import unavailable_reason
from lorafleet.client import LorafleetClient
from lorafleet.common.messages import TokenReply
from lorafleet.ingest.routing import choose_partition
from tests.infra_fixtures import unique_name
from tests.reply_streams import assert_served_once, whole_stream

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")]
ADAPTERS = {"net/attn": "r1-attn", "net/mlp": "r2-mlp", "net/all": "r8-all-rslora", "net/pattern": "r4-pattern"}
ENGINES = ["e0", "e1", "e2"]


@pytest.fixture(scope="module")
def fleet(zoo, tmp_path_factory):
    setup = NetFleetSetup(model=zoo.model("mha"), adapters={a: zoo.adapter("mha", z) for a, z in ADAPTERS.items()},
                       env={"LORAFLEET_KAFKA_RETRY_S": "5"})
    fleet = NetFleet(setup, tmp_path_factory.mktemp("netbed")).start()
    yield fleet
    fleet.stop()


@pytest.fixture
async def client(fleet):
    async with LorafleetClient(fleet.kafka_bootstrap, fleet.redis_url, requests_topic=fleet.topics["requests"]) as c:
        yield c


def _jobs(run: str, n: int, max_tokens: int) -> dict[str, dict]:
    adapters = [*ADAPTERS, None]
    return {f"{run}-{i}": {"adapter": adapters[i % len(adapters)], "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                           "prompt_token_ids": [(7 * i + 3 * j) % 500 + 4 for j in range(4 + i % 5)]}
            for i in range(n)}


def _jobs_on_every_engine(fleet, run: str, per_engine: int, max_tokens: int) -> dict[str, dict]:
    """`per_engine` requests for each engine's partitions (as routed at these low rates)."""
    owners = fleet.wait_settled(ENGINES)
    candidates = _jobs(run, 40 * per_engine, max_tokens)
    chosen: dict[str, dict] = {}
    for engine in ENGINES:
        mine = [rid for rid, job in candidates.items()
                if choose_partition(rid, job["adapter"], fleet.setup.partitions, 1) in owners[engine]]
        assert len(mine) >= per_engine, (engine, owners)
        chosen.update({rid: candidates[rid] for rid in mine[:per_engine]})
    return chosen


async def _submit(client, jobs: dict[str, dict]) -> None:
    for rid, job in jobs.items():
        await client.submit({"id": rid, **job})


async def _check(client, fleet, jobs, reference, zoo, timeout_s: float = 240) -> None:
    """Each request done, its whole stream: every token once, the reference's, one terminal entry."""
    for rid, job in jobs.items():
        async for _ in client.replies(rid, timeout=timeout_s):
            pass
        tokens = assert_served_once(await whole_stream(client.redis, rid), rid)
        adapter = zoo.adapter("mha", ADAPTERS[job["adapter"]]) if job["adapter"] else None
        assert tokens == reference.greedy(zoo.model("mha"), adapter, job["prompt_token_ids"], job["max_tokens"]), rid
    for name in ("store", "ingest", *ENGINES):
        assert fleet.procs[name].poll() is None, f"{name} exited: {fleet.log_tail(name)}"


async def _streaming(client, rids: list[str], timeout_s: float = 120) -> None:
    """Wait until every request in `rids` has a token entry out (all of them mid-generation)."""
    for rid in rids:
        async for entry in client.replies(rid, timeout=timeout_s):
            if isinstance(entry, TokenReply):
                break


def _owned_by(fleet, engine: str, jobs: dict[str, dict]) -> list[str]:
    owners = fleet.wait_settled(ENGINES)
    return [rid for rid, job in jobs.items()
            if choose_partition(rid, job["adapter"], fleet.setup.partitions, 1) in owners[engine]]


def test_hosts_talk_only_over_the_bed_addresses(fleet):
    """Every established TCP connection in every host is between two of the bed's addresses."""
    for name in fleet.bed.hosts:
        out = subprocess.run(fleet.bed.argv(name, ["ss", "-Htn", "state", "established"]), capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            local, peer = (field.rsplit(":", 1)[0] for field in line.split()[-2:])
            assert ipaddress.ip_address(local) in fleet.bed.subnet, (name, line)
            assert ipaddress.ip_address(peer) in fleet.bed.subnet, (name, line)
    assert all(subprocess.run(fleet.bed.argv(e, ["ss", "-Htn", "state", "established"]), check=False,
                              capture_output=True, text=True).stdout.strip() for e in ENGINES), "every engine holds connections"


async def test_latency_and_jitter_between_the_engines_and_redis_and_the_broker(fleet, client, reference, zoo):
    for engine in ENGINES:
        for server in ("redis", "broker"):
            fleet.add_latency(engine, server, delay_ms=20, jitter_ms=10, seed=hash((engine, server)) % 1000)
    try:
        jobs = _jobs_on_every_engine(fleet, unique_name("slow"), 5, 24)
        await _submit(client, jobs)
        await _check(client, fleet, jobs, reference, zoo)
        for engine in ENGINES:  # each served some, its connections made again through the relays
            assert fleet.relayed_connections(engine, "redis") >= 1 and fleet.relayed_connections(engine, "broker") >= 1
    finally:
        for engine in ENGINES:
            for server in ("redis", "broker"):
                fleet.remove_latency(engine, server)


async def test_an_engine_cut_off_mid_generation_and_reconnected(fleet, client, reference, zoo):
    jobs = _jobs_on_every_engine(fleet, unique_name("cut"), 5, 160)
    victims = _owned_by(fleet, "e0", jobs)
    before = fleet.wait_settled(ENGINES)
    await _submit(client, jobs)
    await _streaming(client, victims)
    fleet.bed.cut("e0")
    try:  # the others take its partitions once its session times out, and serve its requests
        after = fleet.wait_settled(["e1", "e2"])
        for engine in ("e1", "e2"):  # sticky assignment: each keeps its own, and so its adapters
            assert before[engine] <= after[engine], (before, after)
        await _check(client, fleet, jobs, reference, zoo)
    finally:
        fleet.bed.reconnect("e0")
    fleet.wait_settled(ENGINES)  # back in the group: a new assignment of all partitions
    assert fleet.events("e0", "redis error, retrying"), "e0 wrote nothing while cut off?"
    assert fleet.events("e0", "partitions revoked")
    for rid in jobs:  # read again after its late writes: still every token once
        assert_served_once(await whole_stream(client.redis, rid), rid)
    later = _jobs_on_every_engine(fleet, unique_name("after-cut"), 2, 8)  # and e0 serves again
    await _submit(client, later)
    await _check(client, fleet, later, reference, zoo)
    assert {e["request_id"] for e in fleet.events("e0", "request done")} & set(later)


async def test_redis_unreachable_from_one_engine_only(fleet, client, reference, zoo):
    jobs = _jobs_on_every_engine(fleet, unique_name("redis-cut"), 5, 120)
    cut_off = _owned_by(fleet, "e1", jobs)
    others = [rid for rid in jobs if rid not in cut_off]
    await _submit(client, jobs)
    await _streaming(client, cut_off)
    fleet.bed.isolate("e1", "redis")
    try:
        for rid in others:  # the other engines finish theirs meanwhile
            async for _ in client.replies(rid, timeout=240):
                pass
        deadline = time.monotonic() + 60
        while not fleet.events("e1", "redis unreachable; intake paused, retrying"):
            assert time.monotonic() < deadline, "e1 never noticed Redis was gone"
            await asyncio.sleep(0.2)
    finally:
        fleet.bed.heal("e1", "redis")
    await _check(client, fleet, jobs, reference, zoo)


async def test_the_broker_unreachable_from_the_ingest_for_a_while(fleet, client, reference, zoo):
    fleet.wait_settled(ENGINES)
    said_before = len(fleet.events("ingest"))
    fleet.bed.isolate("ingest", "broker")
    try:
        jobs = _jobs(unique_name("ingest-cut"), 12, 16)
        await _submit(client, jobs)  # the runner still reaches the broker: the requests wait there
        deadline = time.monotonic() + 120
        while not [e for e in fleet.events("ingest")[said_before:] if e.get("level") in ("warning", "error")]:
            assert time.monotonic() < deadline, "the ingest never noticed the broker was gone"
            await asyncio.sleep(0.2)
    finally:
        fleet.bed.heal("ingest", "broker")
    await _check(client, fleet, jobs, reference, zoo)
