"""A server-sent-event response that notices a client going away while it waits for tokens.

Starlette's StreamingResponse learns of a disconnect only when the server says so (ASGI < 2.4)
or when a write fails (2.4), and then leaves the generator suspended until it is collected. An
answer waiting on a slow engine writes nothing for a while, and its requests must be cancelled
at once, not when the next token fails to send. So this response reads `receive` for
`http.disconnect` beside the writes, and on the first of (disconnect, server cancellation, write
failure) stops the events and awaits `on_abandon` before returning; the events generator is always
closed and `on_close` always called.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # proxies (nginx) must not hold events back


class EventStream:
    def __init__(self, events: AsyncIterator[bytes], on_abandon: Callable[[str], Awaitable[None]],
                 on_close: Callable[[], None]) -> None:
        self.events = events
        self.on_abandon = on_abandon
        self.on_close = on_close  # always, last

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        writer, watcher = asyncio.create_task(pump()), asyncio.create_task(disconnected())
        reason = None
        try:
            done, _ = await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done and not writer.done():
                reason = "disconnect"
            elif writer.done() and writer.exception() is not None:  # a write failed: the client is gone
                reason = "disconnect" if isinstance(writer.exception(), OSError) else "error"
        except asyncio.CancelledError:
            reason = "shutdown"  # the server gave up on this connection (its graceful-shutdown timeout)
            raise
        finally:
            for task in (writer, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            with contextlib.suppress(Exception):
                await self.events.aclose()
            try:
                if reason is not None:
                    await asyncio.shield(self.on_abandon(reason))
            finally:
                self.on_close()
        if reason == "error":  # a bug in the events: the server logs it
            raise writer.exception()
