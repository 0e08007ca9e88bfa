"""One reader of every reply stream a gateway replica waits on.

A gateway holds many answers open at once (each a request's reply stream). Reading each with its
own blocking XREAD would hold one Redis connection per open answer; instead one loop issues one
blocking XREAD over all the keys in wait, and hands each entry to its subscription's queue. A key
subscribed while that XREAD blocks would wait for the block to end, so the new subscription
unblocks it (CLIENT UNBLOCK from a second connection) and the next XREAD includes the key.

Invariants: a subscription sees its stream from the first entry, each token once (a token entry
re-published after a Redis restart is dropped by its index), and nothing after the terminal
entry; the loop stops reading a key at its terminal entry or when the subscription closes.
Redis errors never end the loop: it backs off and reads again from each key's last entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis import asyncio as aioredis

from lorafleet.common import settings
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import TokenIndexFilter, is_terminal, parse_entry
from lorafleet.common.retry import outage_backoff

BLOCK_MS = 1000  # the longest one XREAD waits; a new key unblocks it at once
ENTRIES_PER_KEY = 256  # per XREAD round


class ReplySubscription:
    """One reply stream being read: its entries go to `sink` as (key, entry), in order, each token
    once, ending with the terminal entry."""

    def __init__(self, key: str, sink: asyncio.Queue) -> None:
        self.key = key
        self.sink = sink
        self.last_id = "0-0"  # the next XREAD reads after this entry id
        self.tokens = TokenIndexFilter()


class ReplyMux:
    def __init__(self, redis_url: str) -> None:
        timeout = settings.read("REDIS_TIMEOUT_S")
        # The reader's socket timeout covers the blocking XREAD; the control connection is the
        # bounded one every other gateway call uses (CLIENT UNBLOCK, cancellations).
        self._reader = aioredis.from_url(redis_url, single_connection_client=True,
                                         socket_timeout=timeout + BLOCK_MS / 1000, socket_connect_timeout=timeout)
        self.control = aioredis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._subscriptions: dict[str, ReplySubscription] = {}
        self._has_keys = asyncio.Event()
        self._reader_id: int | None = None
        self._generation = 0  # bumped by every subscribe; the XREAD in flight read keys of `_read_generation`
        self._read_generation = 0
        self._reading = False
        self._waker: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self._log = get_logger("gateway", part="reply-mux")

    async def start(self) -> None:
        await self.control.ping()
        self._loop_task = asyncio.create_task(self._run(), name="reply-mux")

    async def close(self) -> None:
        for task in (self._loop_task, self._waker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._reader.aclose()
        await self.control.aclose()

    @property
    def open_streams(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, key: str, sink: asyncio.Queue) -> ReplySubscription:
        if key in self._subscriptions:  # two waiters of one stream would split its entries
            raise ValueError(f"reply stream {key!r} is already subscribed")
        subscription = ReplySubscription(key, sink)
        self._subscriptions[key] = subscription
        self._generation += 1
        self._has_keys.set()
        if self._reading and (self._waker is None or self._waker.done()):
            self._waker = asyncio.create_task(self._unblock_stale_read())
        return subscription

    def unsubscribe(self, subscription: ReplySubscription) -> None:
        if self._subscriptions.get(subscription.key) is subscription:
            del self._subscriptions[subscription.key]
        if not self._subscriptions:
            self._has_keys.clear()

    async def _unblock_stale_read(self) -> None:
        """Unblock the XREAD in flight while it lacks a key subscribed since it was sent. CLIENT
        UNBLOCK answers 0 when the XREAD has not reached Redis yet: try again shortly (bounded)."""
        for _ in range(50):
            if not self._reading or self._read_generation >= self._generation or self._reader_id is None:
                return
            try:
                if await self.control.client_unblock(self._reader_id):
                    return
            except Exception as exc:  # Redis away: the reader's own timeout ends its XREAD
                self._log.warning("client unblock failed", error=repr(exc))
                return
            await asyncio.sleep(0.002)

    async def _run(self) -> None:
        backoff = outage_backoff()
        while True:
            await self._has_keys.wait()
            try:
                if self._reader_id is None:  # a new connection (first, or after an error) has a new id
                    self._reader_id = await self._reader.client_id()
                response = await self._read_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._reader_id = None
                self._log.warning("reading reply streams failed; retrying", error=repr(exc),
                                  streams=len(self._subscriptions))
                await backoff.sleep()
                continue
            backoff.reset()
            self._dispatch(response or [])

    async def _read_once(self) -> Any:
        self._read_generation = self._generation
        streams = {key: sub.last_id for key, sub in self._subscriptions.items()}
        self._reading = True
        try:
            return await self._reader.xread(streams, count=ENTRIES_PER_KEY, block=BLOCK_MS)
        finally:
            self._reading = False

    def _dispatch(self, response: Any) -> None:
        for raw_key, entries in response:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            subscription = self._subscriptions.get(key)
            if subscription is None:  # closed while the XREAD was in flight
                continue
            for entry_id, fields in entries:
                subscription.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    entry = parse_entry(fields)
                except ValueError as exc:  # not a contract entry: skip it, keep the stream
                    self._log.warning("malformed reply entry skipped", stream=key, error=str(exc))
                    continue
                if not subscription.tokens.is_new(entry):
                    continue
                subscription.sink.put_nowait((key, entry))
                if is_terminal(entry):
                    self.unsubscribe(subscription)
                    break
