"""A small asyncio client of the public contract: produce requests, read reply streams.

    async with LorafleetClient("127.0.0.1:9092", "redis://127.0.0.1:6379/0") as client:
        stream = await client.submit({"id": "r1", "prompt": "Hello", "max_tokens": 16})
        async for entry in client.replies(stream=stream):
            ...                                   # TokenReply..., then DoneReply or ErrorReply
        text, token_ids, last = await client.generate({"id": "r2", "prompt": "Hi"})

Only what CONTRACT.md promises is used, so it works against any lorafleet deployment.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import msgspec

from lorafleet.common import settings
from lorafleet.common.contract import cancel_key, default_reply_stream
from lorafleet.common.kafka import make_producer
from lorafleet.common.messages import ReplyEntry, TokenIndexFilter, TokenReply, is_terminal, parse_entry
from lorafleet.common.replies import connect_redis


class Generation(msgspec.Struct, frozen=True):
    text: str
    token_ids: list[int]
    terminal: ReplyEntry  # DoneReply or ErrorReply

    def __iter__(self):  # allows `text, token_ids, terminal = await client.generate(...)`
        return iter((self.text, self.token_ids, self.terminal))


class LorafleetClient:
    def __init__(self, kafka_bootstrap: str | None, redis_url: str, *,
                 requests_topic: str | None = None) -> None:
        """kafka_bootstrap None: a reader of reply streams only (submit raises)."""
        self.requests_topic = requests_topic or settings.read("REQUESTS_TOPIC")
        self.redis = connect_redis(redis_url)
        self.producer = make_producer(kafka_bootstrap, client_id="lorafleet-client") if kafka_bootstrap else None
        self._started = False

    async def start(self) -> None:
        if self.producer is not None and not self._started:
            await self.producer.start()
            self._started = True

    async def close(self) -> None:
        if self._started:
            await self.producer.stop()
            self._started = False
        await self.redis.aclose()

    async def __aenter__(self) -> "LorafleetClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def submit(self, request: dict) -> str:
        """Produce one request (JSON); returns the stream key its replies will arrive on.
        Keyed by adapter id (or request id) - lorafleet does not depend on the key."""
        return (await self.submit_many([request]))[0]

    async def submit_many(self, requests: list[dict]) -> list[str]:
        """Produce many requests at once: all are handed to the producer, which batches them, and
        then every acknowledgement is awaited (one round trip per batch instead of per request).
        Returns their stream keys in order; a request without a string id is refused before any
        is sent. Raises on the first request the broker refused."""
        if not all(isinstance(r.get("id"), str) for r in requests):
            raise ValueError("every request needs a string id (use submit_raw to send anything else)")
        if self.producer is None:
            raise ValueError("this client was made without a Kafka bootstrap: it reads replies only")
        await self.start()
        acks = [await self.producer.send(self.requests_topic, msgspec.json.encode(r),
                                         key=str(r.get("adapter") or r["id"]).encode()) for r in requests]
        await asyncio.gather(*acks)
        return [r["reply_stream"] if isinstance(r.get("reply_stream"), str) else default_reply_stream(r["id"])
                for r in requests]

    async def submit_raw(self, value: bytes | None, key: bytes | None = None) -> None:
        """Produce arbitrary bytes to the requests topic (tests of the dead-letter path)."""
        if self.producer is None:
            raise ValueError("this client was made without a Kafka bootstrap: it reads replies only")
        await self.start()
        await self.producer.send_and_wait(self.requests_topic, value, key=key)

    async def replies(self, request_id: str | None = None, *, stream: str | None = None,
                      timeout: float = 120.0) -> AsyncIterator[ReplyEntry]:
        """Entries of one reply stream from its start, until (and including) the terminal entry,
        each token once (a token entry whose `index` was read already is skipped: the engine
        re-publishes what a restarted Redis lost). Give the request id (default stream) or the
        stream key. Raises TimeoutError when no
        terminal entry arrives within `timeout` seconds."""
        if (request_id is None) == (stream is None):
            raise ValueError("give exactly one of request_id and stream")
        key = stream if stream is not None else default_reply_stream(request_id)
        deadline = time.monotonic() + timeout
        last_id = "0-0"
        seen = TokenIndexFilter()
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise TimeoutError(f"no terminal entry on {key!r} within {timeout}s")
            response = await self.redis.xread({key: last_id}, count=512, block=min(left_ms, 1000))
            for _key, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    entry = parse_entry(fields)
                    if not seen.is_new(entry):
                        continue
                    yield entry
                    if is_terminal(entry):
                        return

    async def cancel(self, request_id: str) -> None:
        """Cancel a request (contract extension): it ends with an `error` entry, code `cancelled`,
        at its engine's next step, or as soon as an engine takes it; a finished one is unchanged."""
        await self.redis.set(cancel_key(request_id), b"1", ex=settings.read("STREAM_TTL_S"))

    async def generate(self, request: dict, timeout: float = 120.0) -> Generation:
        """Submit and wait: the whole text, all token ids, and the terminal entry. The request
        carries a deadline `timeout` seconds away (unless it has one), and is cancelled when no
        terminal entry arrives in time (TimeoutError)."""
        request = {"deadline_ms": int((time.time() + timeout) * 1000), **request}
        stream = await self.submit(request)
        texts: list[str] = []
        token_ids: list[int] = []
        try:
            async for entry in self.replies(stream=stream, timeout=timeout):
                if isinstance(entry, TokenReply):
                    texts.append(entry.text)
                    token_ids.extend(entry.token_ids)
                else:
                    return Generation("".join(texts), token_ids, entry)
        except TimeoutError:
            await self.cancel(request["id"])
            raise
        raise AssertionError("replies() ends only with a terminal entry")
