"""Health checks behind `lorafleet ingest|engine|adapter-store|gateway --check live|ready` (Kubernetes
exec probes), and the heartbeat the running services keep for them.

    live   the service finished starting and its event loop still turns: the ready file exists
           and its heartbeat (mtime, touched every HEARTBEAT_INTERVAL_S) is fresh. No dependency
           is checked, so a broker or Redis outage never restarts every pod at once. The engine
           also withholds its heartbeat while one step has run longer than its stall limit
           (engine/serving/stall_watch.py): the step runs on the engine thread, so the event loop would keep beating
           through a GPU hang or a tensor-parallel collective waiting for a dead rank.
    ready  live, plus what the service needs to work right now, checked from the pod itself:
             ingest         Kafka answers and the requests and work topics exist; Redis answers PING
             engine         Kafka answers and the work topic exists; Redis answers PING; the node's
                            adapter store answers its health request
             adapter-store  its own TCP server answers the health request (model spec loaded,
                            shared folder set up)
             gateway        Kafka answers and the requests topic exists; Redis answers PING

The ready file is written by the service only once it can take work (engine: model loaded into
the pool and consumer started; ingest: tokenizer loaded, topics created, consumer started), so
"ready file present and fresh" is the proof that the model is loaded. Each check prints one line
(`ok: ...` or `unhealthy: reason; reason`) and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from lorafleet.common.logging import get_logger

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_STALE_S = 30.0  # 6 missed beats: the event loop is stuck (or the process is gone)
CHECK_TIMEOUT_S = 5.0  # per dependency; probes give the whole command timeoutSeconds >= 15


async def keep_heartbeat(path: str | Path, interval_s: float = HEARTBEAT_INTERVAL_S,
                         problem: Callable[[], str | None] | None = None) -> None:
    """Touch `path` every `interval_s` until cancelled (run it beside the service's task); while
    problem() names one, do not (the liveness probe then fails and the pod is restarted)."""
    withheld = None
    while True:
        await asyncio.sleep(interval_s)
        reason = problem() if problem is not None else None
        if reason is not None:
            if withheld is None:
                get_logger("health").error("liveness heartbeat withheld", reason=reason)
            withheld = reason
            continue
        withheld = None
        with suppress(FileNotFoundError):
            os.utime(path)


def heartbeat_problem(path: str | None, now: float | None = None, stale_s: float = HEARTBEAT_STALE_S) -> str | None:
    if not path:
        return "no --ready-file given: the heartbeat cannot be checked"
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except FileNotFoundError:
        return f"ready file {path} is missing: the service has not finished starting"
    if age > stale_s:
        return f"heartbeat of {path} is {age:.0f}s old (limit {stale_s:.0f}s): the service's event loop is stuck"
    return None


async def kafka_problem(bootstrap: str, topics: list[str]) -> str | None:
    """None when the brokers answer metadata and every topic in `topics` exists."""
    from aiokafka.admin import AIOKafkaAdminClient

    from lorafleet.common.kafka import security_options

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="lorafleet-check", **security_options(),
                                request_timeout_ms=int(CHECK_TIMEOUT_S * 1000))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
    except Exception as exc:  # any failure to talk to the broker is the finding
        return f"Kafka at {bootstrap} unreachable: {type(exc).__name__}: {exc}"
    finally:
        with suppress(Exception):
            await admin.close()
    missing = sorted(set(topics) - existing)
    return f"Kafka at {bootstrap} lacks topics {missing}" if missing else None


async def redis_problem(url: str) -> str | None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S)
    try:
        await client.ping()
        return None
    except Exception as exc:
        return f"Redis unreachable: {type(exc).__name__}: {exc}"  # the URL may hold a password: not printed
    finally:
        with suppress(Exception):
            await client.aclose()


def _connect_host(host: str) -> str:
    """A listen address of 'any' is reached through loopback from inside the pod."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


async def store_problem(address: str) -> str | None:
    """None when the adapter store at `address` answers its health request with ok."""
    from lorafleet.adapter_store.config import parse_address
    from lorafleet.adapter_store.protocol import MAX_LINE_BYTES, StoreRequest, decode_reply, encode

    host, port = parse_address(address)
    writer = None
    try:
        reader, writer = await asyncio.open_connection(_connect_host(host), port, limit=MAX_LINE_BYTES)
        writer.write(encode(StoreRequest("health")))
        await writer.drain()
        reply = decode_reply(await reader.readline())
    except Exception as exc:
        return f"adapter store at {address} unreachable: {type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    if reply.status != "ok" or reply.health is None:
        return f"adapter store at {address} answered health with {reply.status}: {reply.message}"
    return None


def _dependency_checks(service: str, args: argparse.Namespace) -> list:
    if service == "ingest":
        return [kafka_problem(args.kafka_bootstrap, [args.requests_topic, args.work_topic]), redis_problem(args.redis_url)]
    if service == "engine":
        return [kafka_problem(args.kafka_bootstrap, [args.work_topic]), redis_problem(args.redis_url),
                store_problem(args.store_address)]
    if service == "adapter-store":
        return [store_problem(args.address)]
    if service == "gateway":
        return [kafka_problem(args.kafka_bootstrap, [args.requests_topic]), redis_problem(args.redis_url)]
    raise ValueError(f"no health check for service {service!r}")


async def _bounded(check) -> str | None:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT_S + 1)
    except asyncio.TimeoutError:
        return f"a check took longer than {CHECK_TIMEOUT_S + 1:.0f}s"


async def problems(service: str, mode: str, args: argparse.Namespace) -> list[str]:
    """Every reason `service` is not `mode` ('live' or 'ready'); empty when it is."""
    if mode not in ("live", "ready"):
        raise ValueError(f"--check must be live or ready, got {mode!r}")
    found = [heartbeat_problem(args.ready_file)]
    if mode == "ready":
        found += await asyncio.gather(*(_bounded(c) for c in _dependency_checks(service, args)))
    return [p for p in found if p]


def run_check(service: str, args: argparse.Namespace) -> int:
    """`lorafleet <service> --check MODE`: print one line, return the exit status."""
    found = asyncio.run(problems(service, args.check, args))
    if found:
        print(f"unhealthy: {'; '.join(found)}", flush=True)
        return 1
    print(f"ok: {service} {args.check}", flush=True)
    return 0
