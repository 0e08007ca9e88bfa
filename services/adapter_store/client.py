"""What engines use to get adapters from their node's store process.

    client = AdapterStoreClient("127.0.0.1:7070", spec, max_rank=256)
    weights = await client.get("tenant-a/sql-v3")   # LoraWeights, validated by the store
    await client.prefetch("tenant-b/chat")          # fire and forget

Connections are pooled (one request at a time on each). Connection failures, a store that is
restarting, and a file evicted between the reply and the read are retried with backoff, boundedly,
then raised as AdapterStoreUnavailable. A store reply "error" (storage unreachable after the
store's own retries) is raised at once as AdapterStoreUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import structlog

from lorafleet.common.ids import validate_adapter_id
from lorafleet.formats.lora_weights import LoraWeights, load_canonical
from lorafleet.formats.model_spec import ModelSpec

from .config import parse_address
from .errors import AdapterNotFoundError, AdapterStoreUnavailable, InvalidAdapterError
from .protocol import MAX_LINE_BYTES, HealthInfo, StoreReply, StoreRequest, decode_reply, encode
from .retry import RetryPolicy, with_retries

_CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, EOFError)


class _StoreConnectionLost(Exception):
    """The connection broke mid request, or the reply line was garbage: ask again on a new one."""


class AdapterStoreClient:
    def __init__(
        self,
        address: str,
        spec: ModelSpec,
        *,
        max_rank: int = 256,
        retry: RetryPolicy = RetryPolicy(attempts=6, base_delay_s=0.1, max_delay_s=2.0),
        request_timeout_s: float = 600.0,  # a get waits for the whole download + validation
        max_idle_connections: int = 8,
    ) -> None:
        self._host, self._port = parse_address(address)
        self.address = address
        self.spec = spec
        self.max_rank = max_rank
        self.retry = retry
        self.request_timeout_s = request_timeout_s
        self._max_idle = max_idle_connections
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, adapter_id: str) -> LoraWeights:
        """The adapter's validated weights, loaded into this process from the shared folder."""
        validate_adapter_id(adapter_id)
        log = structlog.get_logger().bind(adapter_id=adapter_id)

        async def ask_and_load() -> LoraWeights:
            path = await self._get_path_once(adapter_id)
            # FileNotFoundError: evicted between the reply and this read -> transient, ask again.
            return await asyncio.to_thread(load_canonical, path, self.spec, self.max_rank)

        try:
            return await with_retries(ask_and_load, self.retry, _is_transient, log, "get")
        except (_StoreConnectionLost, FileNotFoundError, *_CONNECTION_ERRORS) as exc:
            raise AdapterStoreUnavailable(f"adapter store at {self.address} unavailable for {adapter_id!r}: {exc!r}") from exc

    async def get_path(self, adapter_id: str) -> Path:
        """Only the path of the canonical file (the caller loads it soon: it may be evicted)."""
        validate_adapter_id(adapter_id)
        return await self._get_path_once(adapter_id)

    async def prefetch(self, adapter_id: str) -> None:
        validate_adapter_id(adapter_id)
        self._check(await self._request(StoreRequest("prefetch", adapter_id)), adapter_id)

    async def health(self) -> HealthInfo:
        reply = await self._request(StoreRequest("health"))
        if reply.status != "ok" or reply.health is None:
            raise AdapterStoreUnavailable(f"adapter store at {self.address} answered health with {reply.status}: {reply.message}")
        return reply.health

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _get_path_once(self, adapter_id: str) -> Path:
        reply = self._check(await self._request(StoreRequest("get", adapter_id)), adapter_id)
        if reply.path is None:
            raise AdapterStoreUnavailable(f"adapter store at {self.address} answered ok without a path for {adapter_id!r}")
        return Path(reply.path)

    def _check(self, reply: StoreReply, adapter_id: str) -> StoreReply:
        if reply.status == "ok":
            return reply
        message = reply.message or f"adapter {adapter_id!r}: {reply.status}"
        if reply.status == "not_found":
            raise AdapterNotFoundError(message)
        if reply.status == "invalid":
            raise InvalidAdapterError(message)
        if reply.status == "bad_request":
            raise ValueError(message)
        raise AdapterStoreUnavailable(message)

    async def _request(self, request: StoreRequest) -> StoreReply:
        """One round trip; connection-level failures are retried on a fresh connection."""
        log = structlog.get_logger().bind(adapter_id=request.adapter)
        try:
            return await with_retries(lambda: self._round_trip(request), self.retry, _is_transient, log, request.op)
        except (_StoreConnectionLost, *_CONNECTION_ERRORS) as exc:
            raise AdapterStoreUnavailable(f"adapter store at {self.address} unreachable: {exc!r}") from exc

    async def _round_trip(self, request: StoreRequest) -> StoreReply:
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, limit=MAX_LINE_BYTES), timeout=10.0
            )
        healthy = False
        try:
            writer.write(encode(request))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout=self.request_timeout_s)
            if not line.endswith(b"\n"):  # EOF: a pooled connection the store closed (restart)
                raise _StoreConnectionLost("connection closed by the adapter store")
            try:
                reply = decode_reply(line)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise _StoreConnectionLost(f"unreadable reply from the adapter store: {exc}") from None
            healthy = True
            return reply
        finally:
            if healthy and len(self._idle) < self._max_idle:
                self._idle.append((reader, writer))
            else:
                writer.close()


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (_StoreConnectionLost, FileNotFoundError, *_CONNECTION_ERRORS))
