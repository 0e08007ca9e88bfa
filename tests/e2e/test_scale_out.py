"""Scale-out on one machine: the node's adapter store, ingest and three engine processes in one
consumer group (`lorafleet ...` processes, real Tansu broker, real redis-server).

A. A burst over twelve adapters (chosen so every work partition gets two) and the base model is
   spread over all three engines (each engine's "request done" log lines say what it served);
   every adapter is served by one engine only (affinity), measured against plain hashing of the
   same requests over the same partition owners; tokens equal the HF reference.
B. One engine SIGKILLed mid-generation: the others serve its unfinished requests after the group
   rebalances, each with exactly one terminal entry and the reference's tokens.
C. One engine SIGTERMed with requests in hand: it finishes them, commits, leaves the group and
   exits 0 without its drain timing out; the last engine serves the rest; nothing is lost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.bench.affinity import markdown, write_results
from lorafleet.bench.affinity import run as simulate_affinity
from lorafleet.bench.netbed.fleet import log_events, settled_assignment
from lorafleet.client import LorafleetClient
from lorafleet.common.embedded import free_port
from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply, parse_entry
from lorafleet.ingest.routing import candidate_partitions, choose_partition, stable_hash
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]
PARTITIONS, ENGINES, DRAIN_TIMEOUT_S = 6, 3, 20.0
ZOO_ADAPTERS = ("r1-attn", "r2-mlp", "r8-all-rslora", "r16-qv-layer1", "r4-pattern")
ENV = dict(os.environ, LORAFLEET_KAFKA_SESSION_TIMEOUT_MS="6000", LORAFLEET_LOG_LEVEL="info")


def _adapters() -> dict[str, str]:
    """Two adapter ids per work partition (rendezvous top choice), each a copy of a zoo adapter."""
    per_partition, chosen, i = {p: 0 for p in range(PARTITIONS)}, {}, 0
    while min(per_partition.values()) < 2:
        adapter = f"fleet/a{i:02d}"
        top = candidate_partitions(adapter, PARTITIONS, 1)[0]
        if per_partition[top] < 2:
            per_partition[top] += 1
            chosen[adapter] = ZOO_ADAPTERS[len(chosen) % len(ZOO_ADAPTERS)]
        i += 1
    return chosen


class Fleet:
    def __init__(self, tmp: Path, kafka: str, redis: str, model: Path, root: str):
        self.tmp, self.kafka, self.redis, self.model = tmp, kafka, redis, model
        self.topics = {k: unique_name(k) for k in ("requests", "dlq", "work")}
        self.store_address = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # processes this test stopped on purpose
        common = ["--kafka-bootstrap", kafka, "--redis-url", redis, "--model", str(model), "--work-topic",
                  self.topics["work"], "--work-partitions", str(PARTITIONS)]
        self.start("store", ["adapter-store", "--model", str(model), "--adapters", root, "--address",
                             self.store_address, "--shm-dir", str(tmp / "shm")])
        self.start("ingest", ["ingest", *common, "--requests-topic", self.topics["requests"], "--dlq-topic",
                              self.topics["dlq"], "--group-id", unique_name("ingest")])
        engine_group = unique_name("engines")
        self.engines = [f"e{i}" for i in range(ENGINES)]
        for name in self.engines:
            self.start(name, ["engine", *common, "--store-address", self.store_address, "--group-id", engine_group,
                              "--engine-id", name, "--device", "cpu", "--pool-pages", "128", "--max-batched-tokens",
                              "64", "--drain-timeout-s", str(DRAIN_TIMEOUT_S)])

    def start(self, name: str, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "lorafleet.cli", *argv, "--ready-file", str(self.tmp / f"{name}.ready")]
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.procs[name] = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)

    def events(self, name: str, event: str | None = None) -> list[dict]:
        return log_events(self.tmp / f"{name}.log", event)

    def assignment(self, names) -> dict[str, set[int]] | None:
        return settled_assignment({n: self.tmp / f"{n}.log" for n in names}, PARTITIONS)

    async def wait(self, what, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while not (result := what()):
            for name, proc in self.procs.items():
                assert proc.poll() is None or name in self.stopped, f"{name} exited: {(self.tmp / f'{name}.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.2)
        return result


    def served(self, name: str, prefix: str) -> list[dict]:
        return [e for e in self.events(name, "request done") if e["request_id"].startswith(prefix)]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _requests(run: str, adapters: dict[str, str], per_adapter: int, base: int, max_tokens: int) -> dict[str, dict]:
    jobs, ids = {}, [a for a in adapters for _ in range(per_adapter)] + [None] * base
    for i, adapter in enumerate(ids):
        jobs[f"{run}-{i}"] = {"adapter": adapter, "prompt_token_ids": [(7 * i + 3 * j) % 500 + 4 for j in range(4 + i % 5)],
                              "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return jobs


def _partition(rid: str, job: dict) -> int:  # ingest's choice at these rates (far below the hot threshold)
    return choose_partition(rid, job["adapter"], PARTITIONS, 1)


async def _submit(client: LorafleetClient, jobs: dict[str, dict]) -> None:
    for rid, job in jobs.items():
        await client.submit({"id": rid, **job})


async def _check_replies(client, jobs, adapters, zoo, reference, model) -> None:
    for rid, job in jobs.items():
        entries = [e async for e in client.replies(rid, timeout=150)]
        adapter_dir = zoo.adapter("mha", adapters[job["adapter"]]) if job["adapter"] else None
        want = reference.greedy(model, adapter_dir, job["prompt_token_ids"], job["max_tokens"])
        assert [t for e in entries if isinstance(e, TokenReply) for t in e.token_ids] == want, rid
        assert isinstance(entries[-1], DoneReply), (rid, entries[-1])


async def _stream_lengths(client, rids) -> dict[str, int]:
    return {rid: await client.redis.xlen(f"lorafleet:out:{rid}") for rid in rids}


async def _has_terminal_entry(client, rid: str) -> bool:
    entries = [parse_entry(f) for _id, f in await client.redis.xrange(f"lorafleet:out:{rid}")]
    return any(isinstance(e, (DoneReply, ErrorReply)) for e in entries)


async def test_three_engines_share_work_survive_a_kill_and_drain_on_sigterm(kafka_bootstrap, redis_url, zoo, reference, tmp_path):
    model, adapters = zoo.model("mha"), _adapters()
    for adapter, source in adapters.items():
        shutil.copytree(zoo.adapter("mha", source), tmp_path / "root" / adapter)
    fleet = Fleet(tmp_path, kafka_bootstrap, redis_url, model, (tmp_path / "root").as_uri())
    all_jobs: dict[str, dict] = {}
    try:
        await fleet.wait(lambda: all((tmp_path / f"{n}.ready").exists() for n in fleet.procs), timeout=150)
        owners = await fleet.wait(lambda: fleet.assignment(fleet.engines))
        # The probes' check against a real engine (broker, Redis, its node's store, heartbeat).
        check = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "lorafleet.cli", "engine", "--check", "ready", "--kafka-bootstrap", kafka_bootstrap,
            "--redis-url", redis_url, "--work-topic", fleet.topics["work"], "--store-address", fleet.store_address,
            "--ready-file", str(tmp_path / "e0.ready")], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

        async with LorafleetClient(kafka_bootstrap, redis_url, requests_topic=fleet.topics["requests"]) as client:
            # --- A: spread and affinity ---------------------------------------------------------
            run_a = unique_name("spread")
            jobs = _requests(run_a, adapters, per_adapter=3, base=6, max_tokens=8)
            all_jobs.update(jobs)
            await _submit(client, jobs)
            await _check_replies(client, jobs, adapters, zoo, reference, model)
            served = {name: fleet.served(name, run_a) for name in fleet.engines}
            assert all(served.values()), {n: len(s) for n, s in served.items()}
            live = _affinity(jobs, served, owners)
            assert live["affinity_loads"] == len(adapters), "each adapter should have been served by one engine"
            assert live["affinity_hit_rate"] > live["hash_hit_rate"]
            simulation = simulate_affinity()
            # Figures go to the test's folder (and the log); bench/results/affinity.* is written by
            # `python -m lorafleet.bench.affinity` runs that are committed on purpose, never by a test run.
            write_results(simulation, live, folder=tmp_path)
            print(markdown(simulation, live))

            # --- B: SIGKILL one engine mid-generation ---------------------------------------------
            victim = fleet.engines[0]
            run_b = unique_name("kill")
            jobs = _requests(run_b, adapters, per_adapter=1, base=3, max_tokens=48)
            all_jobs.update(jobs)
            victims = [rid for rid, job in jobs.items() if _partition(rid, job) in owners[victim]]
            await _submit(client, jobs)
            deadline = time.monotonic() + 60
            while max((await _stream_lengths(client, victims)).values()) < 3:
                assert time.monotonic() < deadline, "the victim produced nothing"
                await asyncio.sleep(0.02)
            fleet.stopped.add(victim)
            fleet.procs[victim].send_signal(signal.SIGKILL)
            fleet.procs[victim].wait()
            # Read once the victim is dead, not before the kill: it kept writing until then, so a
            # request read as unfinished earlier could have been finished by the victim itself.
            unfinished = [rid for rid in victims if not await _has_terminal_entry(client, rid)]
            assert unfinished, "killed too late: the victim had finished everything"
            await _check_replies(client, jobs, adapters, zoo, reference, model)
            survivors = fleet.engines[1:]
            rescued = {e["request_id"] for name in survivors for e in fleet.served(name, run_b)}
            assert set(unfinished) <= rescued, "the victim's unfinished requests must be served by the others"

            # --- C: SIGTERM one engine with work in hand --------------------------------------------
            owners = await fleet.wait(lambda: fleet.assignment(survivors))
            leaver, last = survivors
            run_c = unique_name("drain")
            jobs = _requests(run_c, adapters, per_adapter=1, base=2, max_tokens=32)
            all_jobs.update(jobs)
            mine = [rid for rid, job in jobs.items() if _partition(rid, job) in owners[leaver]]
            await _submit(client, jobs)
            deadline = time.monotonic() + 60
            while max((await _stream_lengths(client, mine)).values()) < 2:
                assert time.monotonic() < deadline, "the leaving engine produced nothing"
                await asyncio.sleep(0.02)
            fleet.stopped.add(leaver)
            fleet.procs[leaver].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(fleet.procs[leaver].wait) == 0
            (draining,) = fleet.events(leaver, "draining")
            assert draining["in_flight"] >= 1, "SIGTERM came when the engine held no request"
            # within its drain timeout: past it the engine gives up on its requests and says so
            assert not fleet.events(leaver, "drain timed out; unfinished requests will be redelivered")
            assert fleet.events(leaver, "engine stopped")
            finished_draining = [e for e in fleet.served(leaver, run_c) if e["timestamp"] >= draining["timestamp"]]
            assert len(finished_draining) >= draining["in_flight"], "it must finish what it held"
            await _check_replies(client, jobs, adapters, zoo, reference, model)
            assert {e["request_id"] for e in fleet.served(last, run_c)}, "the last engine serves the rest"

            # Every request, every phase: exactly one terminal entry, and it is the last entry, read
            # once every process has exited (none can write another entry any more).
            await asyncio.to_thread(fleet.stop_all)
            for rid in all_jobs:
                entries = [parse_entry(f) for _id, f in await client.redis.xrange(f"lorafleet:out:{rid}")]
                terminals = [e for e in entries if isinstance(e, (DoneReply, ErrorReply))]
                assert len(terminals) == 1 and entries[-1] is terminals[0], rid
    finally:
        fleet.stop_all()


def _affinity(jobs: dict[str, dict], served: dict[str, list[dict]], owners: dict[str, set[int]]) -> dict:
    """Adapter loads (distinct engine, adapter pairs) of the live run vs plain hashing of the same
    requests over the same partition owners; hit rate = requests that found their adapter already
    loaded (or loading) on their engine = 1 - loads / adapter requests."""
    owner_of = {p: name for name, parts in owners.items() for p in parts}
    live = {(name, e["adapter_id"]) for name, events in served.items() for e in events if e["adapter_id"]}
    with_adapter = {rid: job for rid, job in jobs.items() if job["adapter"]}
    hashed = {(owner_of[stable_hash(rid) % PARTITIONS], job["adapter"]) for rid, job in with_adapter.items()}
    n = len(with_adapter)
    return {"requests": n, "adapters": len({j["adapter"] for j in with_adapter.values()}), "engines": len(owners),
            "affinity_loads": len(live), "hash_loads": len(hashed),
            "affinity_hit_rate": 1 - len(live) / n, "hash_hit_rate": 1 - len(hashed) / n}
