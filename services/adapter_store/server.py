"""The node's adapter-store process: a TCP server (protocol.py) in front of a SharedMemoryStore.

`lorafleet adapter-store` calls run_adapter_store(config). Engines on the node connect with
AdapterStoreClient, get a path in the shared host-memory folder and load it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable

import msgspec
import structlog

from lorafleet.formats.model_spec import ModelSpec

from .config import AdapterStoreConfig, parse_address
from .errors import AdapterNotFoundError, AdapterStoreUnavailable, InvalidAdapterError
from .metrics import StoreMetrics
from .protocol import MAX_LINE_BYTES, HealthInfo, StoreReply, decode_request, encode
from .shm import SharedMemoryStore
from .source import AdapterSource
from .spill import DiskSpill

log = structlog.get_logger()


class AdapterStoreServer:
    def __init__(self, store: SharedMemoryStore, address: str, metrics: StoreMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or StoreMetrics()
        self._host, self._port = parse_address(address)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> str:
        """Listen; returns the bound 'host:port' (the real port when 0 was asked for)."""
        self._server = await asyncio.start_server(self._serve_connection, self._host, self._port, limit=MAX_LINE_BYTES)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # line over MAX_LINE_BYTES: the stream cannot be resynchronised
                    writer.write(encode(StoreReply("bad_request", message=f"request line over {MAX_LINE_BYTES} bytes")))
                    break
                if not line:
                    break
                writer.write(encode(await self.answer(line)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the engine went away; nothing to answer
        except asyncio.CancelledError:
            # close() cancels connection tasks; ending quietly here keeps asyncio's stream
            # callback (Python 3.11) from logging the cancellation as an error. Loads in flight
            # are shielded and unaffected.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, line: bytes) -> StoreReply:
        started = time.monotonic()
        try:
            request = decode_request(line)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.metrics.on_reply("malformed", "bad_request", None)
            return StoreReply("bad_request", message=f"malformed store request: {exc}")
        cached = request.adapter is not None and request.adapter in self.store.cache
        reply = await self._answer(request)
        self.metrics.on_reply(request.op, reply.status, reply.message)
        if request.op == "get":
            self.metrics.gets.labels("true" if cached else "false").observe(time.monotonic() - started)
        return reply

    async def _answer(self, request) -> StoreReply:
        if request.op == "health":
            return StoreReply("ok", health=self.health())
        if request.adapter is None:
            return StoreReply("bad_request", message=f"op {request.op!r} needs the field 'adapter'")
        try:
            if request.op == "prefetch":
                self.store.prefetch(request.adapter)
                return StoreReply("ok")
            path = await self.store.get_path(request.adapter)
            return StoreReply("ok", path=str(path), nbytes=_size_or_none(path))
        except AdapterNotFoundError as exc:
            return StoreReply("not_found", message=str(exc))
        except InvalidAdapterError as exc:
            return StoreReply("invalid", message=str(exc))
        except ValueError as exc:  # malformed adapter id
            return StoreReply("bad_request", message=str(exc))
        except AdapterStoreUnavailable as exc:
            return StoreReply("error", message=str(exc))
        except Exception as exc:  # a bug must not kill the connection loop; say so and log it
            log.bind(adapter_id=request.adapter).exception("store request failed")
            return StoreReply("error", message=f"internal error: {type(exc).__name__}: {exc}")

    def health(self) -> HealthInfo:
        cache = self.store.cache
        return HealthInfo(
            adapters=len(cache),
            used_bytes=cache.used_bytes,
            budget_bytes=cache.budget_bytes,
            loading=cache.loading,
            fetches=self.store.source.stats.fetches,
        )


def _size_or_none(path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # evicted already; the client will ask again
        return None


def build_shared_store(config: AdapterStoreConfig) -> SharedMemoryStore:
    spec = ModelSpec.from_pretrained(config.model_dir)
    source = AdapterSource(config.adapters_root, max_adapter_bytes=config.max_adapter_bytes, s3=config.s3, retry=config.retry)
    return SharedMemoryStore(
        source,
        spec,
        config.shm_dir,
        memory_bytes=config.memory_bytes,
        negative_ttl_s=config.negative_ttl_s,
        max_rank=config.max_rank,
        spill=None if config.spill_dir is None else DiskSpill(config.spill_dir, config.spill_bytes),
    )


async def run_adapter_store(
    config: AdapterStoreConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    metrics: StoreMetrics | None = None,
) -> None:
    """Serve until `stop` is set (or the task is cancelled); then close and delete the shared files.
    metrics: /metrics' source (requests counted, the store's holdings read at each scrape)."""
    store = build_shared_store(config)
    if metrics is not None:
        metrics.watch(store)
    server = AdapterStoreServer(store, config.address, metrics)
    address = await server.start()
    log.info(
        "adapter store ready",
        address=address,
        adapters_root=config.adapters_root,
        shm_dir=str(config.shm_dir),
        memory_bytes=config.memory_bytes,
    )
    if on_ready is not None:
        on_ready(address)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await server.close()
        await store.aclose()
        log.info("adapter store stopped", address=address)
