"""One OpenAI request in flight: its contract requests produced, their reply streams read, and
every unfinished one cancelled when the answer is abandoned (client gone, timeout, shutdown).

The exchange is the one owner of its requests' state: `choices` (what each has answered so far)
and their subscriptions. It subscribes before producing, so no entry can be missed (reply streams
are read from their first entry anyway), and it always ends with `close()` or `abandon()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from lorafleet.common import settings
from lorafleet.common.contract import cancel_key, default_reply_stream
from lorafleet.common.kafka import with_kafka_retries
from lorafleet.common.messages import ReplyEntry, TokenReply
from lorafleet.gateway.answers import Choice
from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.reply_mux import ReplyMux, ReplySubscription

# How long past a request's deadline the gateway still waits for the engine's own
# deadline_exceeded entry before it answers 504 itself (and cancels).
DEADLINE_GRACE_S = 5.0


class Exchange:
    def __init__(self, requests: list[dict], n: int, *, mux: ReplyMux, producer: AIOKafkaProducer,
                 topic: str, timeout_s: float, log: Any) -> None:
        self.requests = requests
        self.choices = [Choice(index=i, prompt_index=i // n) for i in range(len(requests))]
        self._by_stream = {default_reply_stream(r["id"]): c for r, c in zip(requests, self.choices)}
        self._mux, self._producer, self._topic, self._log = mux, producer, topic, log
        self._sink: asyncio.Queue = asyncio.Queue()
        self._subscriptions: list[ReplySubscription] = []
        self._wait_until = time.monotonic() + timeout_s + DEADLINE_GRACE_S
        self.started = time.monotonic()
        self.first_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    async def send(self) -> None:
        """Subscribe to every reply stream, then produce every request (acks=all); 503 when the
        broker does not take them within the Kafka retry budget."""
        self._subscriptions = [self._mux.subscribe(key, self._sink) for key in self._by_stream]

        async def produce(request: dict) -> None:
            value = msgspec.json.encode(request)
            key = (request["adapter"] or request["id"]).encode()
            await with_kafka_retries(lambda: self._producer.send_and_wait(self._topic, value, key=key),
                                     "produce request")

        try:  # one bound for the whole call: an attempt of its own may wait on the broker much longer
            async with asyncio.timeout(settings.read("KAFKA_RETRY_S")):
                await asyncio.gather(*(produce(r) for r in self.requests))
        except Exception as exc:
            self._log.error("request not queued", error=repr(exc))
            await self.abandon("not queued")  # some may have been taken: cancel those
            raise ApiError(503, f"the request could not be queued (Kafka): {type(exc).__name__}.",
                           code="unavailable") from None

    async def entries(self) -> AsyncIterator[tuple[Choice, ReplyEntry]]:
        """Every reply entry of every choice as it arrives, until all are terminal. ApiError 504
        when they are not within the request's timeout (plus grace)."""
        while not self.finished:
            left = self._wait_until - time.monotonic()
            try:
                key, entry = await asyncio.wait_for(self._sink.get(), max(left, 0.001))
            except TimeoutError:
                raise ApiError(504, "the request did not finish within the gateway's request timeout.",
                               code="deadline_exceeded") from None
            choice = self._by_stream[key]
            if self.first_token_s is None and isinstance(entry, TokenReply):
                self.first_token_s = time.monotonic() - self.started
            choice.add(entry)
            yield choice, entry

    def close(self) -> None:
        for subscription in self._subscriptions:
            self._mux.unsubscribe(subscription)

    async def abandon(self, reason: str) -> None:
        """Cancel every unfinished request (contract cancellation) and stop reading. Bounded: one
        pipelined Redis round trip; a Redis that is away leaves them to their deadline."""
        self.close()
        unfinished = [r["id"] for r, c in zip(self.requests, self.choices) if not c.finished]
        if not unfinished:
            return
        try:
            async with self._mux.control.pipeline(transaction=False) as pipe:
                for request_id in unfinished:
                    pipe.set(cancel_key(request_id), b"1", ex=settings.read("STREAM_TTL_S"))
                await pipe.execute()
            self._log.info("requests cancelled", reason=reason, requests=len(unfinished))
        except Exception as exc:
            self._log.warning("cancelling failed; the requests end at their deadline", reason=reason,
                              error=repr(exc))
