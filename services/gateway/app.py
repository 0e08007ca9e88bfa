"""The OpenAI-compatible HTTP API: routes and the life of one call.

    POST /v1/completions, POST /v1/chat/completions   -> contract requests, answered from their reply streams
    GET  /v1/models, GET /v1/models/{id}              -> the base model and the adapters under the root

Life of a call:
1. authenticate (when an API key is set), read the body (at most MAX_BODY_BYTES), type it
   (openai_api), resolve `model` to an adapter (models), make and validate its contract requests;
2. `Exchange.send`: subscribe to their reply streams, produce them to the requests topic;
3. not streaming: gather every choice to its terminal entry and answer once; streaming: read
   until the first token (an error before it is still an HTTP status), then send each token as an
   SSE chunk, the finish reason and usage on the last, and `data: [DONE]`;
4. a client that goes away, a timeout or a shutdown cancels every unfinished request
   (`Exchange.abandon`); an `error` entry ends the answer with its mapped status (errors).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lorafleet.common.logging import get_logger
from lorafleet.common.messages import ErrorReply, TokenReply
from lorafleet.gateway.answers import AnswerFormat, sse, usage
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.event_stream import EventStream
from lorafleet.gateway.exchange import Exchange
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.models import DEFAULT_PAGE, ModelCatalog
from lorafleet.gateway.openai_api import (
    ChatBody,
    CompletionBody,
    chat_prompts,
    completion_prompts,
    contract_requests,
    decode_body,
)
from lorafleet.gateway.reply_mux import ReplyMux

MAX_BODY_BYTES = 4 << 20  # a chat of many long turns; the contract's own limit per request is 1 MiB


def error_response(error: ApiError) -> JSONResponse:
    headers = {"retry-after": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Gateway:
    def __init__(self, config: GatewayConfig, *, mux: ReplyMux, producer: Any, metrics: GatewayMetrics) -> None:
        self.config, self.mux, self.producer, self.metrics = config, mux, producer, metrics
        self.catalog = ModelCatalog(config.model_name, config.adapters, config.models_cache_s)
        self.log = get_logger("gateway")
        metrics.open_streams.set_function(lambda: mux.open_streams)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
        ])

    async def completions(self, request: Request) -> Any:
        return await self._answer_call(request, chat=False)

    async def chat_completions(self, request: Request) -> Any:
        return await self._answer_call(request, chat=True)

    async def list_models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            try:
                limit = int(request.query_params.get("limit", DEFAULT_PAGE))
            except ValueError:
                raise ApiError(400, "limit must be an integer.", param="limit") from None
            return self._count("models", JSONResponse(await self.catalog.page(request.query_params.get("after"), limit)))
        except ApiError as error:
            return self._count("models", error_response(error))

    async def get_model(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            return self._count("models", JSONResponse(await self.catalog.model(request.path_params["model_id"])))
        except ApiError as error:
            return self._count("models", error_response(error))

    def _count(self, endpoint: str, response: Response) -> Response:
        self.metrics.calls.labels(endpoint, str(response.status_code)).inc()
        return response

    def _authenticate(self, request: Request) -> None:
        if not self.config.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>.", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes (this gateway's limit).")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer_call(self, request: Request, *, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        try:
            self._authenticate(request)
            body = decode_body(await self._read_body(request), ChatBody if chat else CompletionBody)
            prompts = chat_prompts(body) if chat else completion_prompts(body)
            adapter = self.catalog.adapter_of(body.model)
            max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
            answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            deadline_ms = int((time.time() + self.config.request_timeout_s) * 1000)
            requests = contract_requests(body, prompts, request_id=answer_id, adapter=adapter, max_tokens=max_tokens,
                                         deadline_ms=deadline_ms, max_choices=self.config.max_choices)
        except ApiError as error:
            return self._count(endpoint, error_response(error))
        log = self.log.bind(request_id=answer_id, adapter_id=adapter, endpoint=endpoint)
        exchange = Exchange(requests, body.n, mux=self.mux, producer=self.producer,
                            topic=self.config.requests_topic, timeout_s=self.config.request_timeout_s, log=log)
        fmt = AnswerFormat(chat, answer_id, int(time.time()), body.model)
        self.metrics.in_flight.inc()
        streaming = False
        try:
            await exchange.send()
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                response = await self._start_stream(request, exchange, fmt, include_usage, endpoint)
                streaming = isinstance(response, EventStream)
                return response if streaming else self._count(endpoint, response)
            return self._count(endpoint, await self._until_disconnect(request, exchange, self._whole(exchange, fmt)))
        except ApiError as error:
            await exchange.abandon("error")
            return self._count(endpoint, error_response(error))
        finally:
            if not streaming:
                self._finish(exchange, endpoint)

    def _finish(self, exchange: Exchange, endpoint: str) -> None:
        exchange.close()
        self.metrics.in_flight.dec()
        self.metrics.duration.labels(endpoint).observe(time.monotonic() - exchange.started)
        if exchange.first_token_s is not None:
            self.metrics.first_token.labels(endpoint).observe(exchange.first_token_s)
        self.metrics.tokens.inc(sum(c.completion_tokens for c in exchange.choices))

    async def _until_disconnect(self, request: Request, exchange: Exchange, work) -> Any:
        """`work`'s result, unless the client goes away first: then its requests are cancelled."""
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            self.metrics.abandoned.labels("disconnect").inc()
            await exchange.abandon("disconnect")
            return Response(status_code=499)  # nobody reads it; counted as the client's close
        return task.result()

    async def _whole(self, exchange: Exchange, fmt: AnswerFormat) -> JSONResponse:
        try:
            async for _choice, entry in exchange.entries():
                if isinstance(entry, ErrorReply):
                    raise ApiError.from_reply(entry.code, entry.message)
        except ApiError as error:
            if error.status == 504:
                self.metrics.abandoned.labels("timeout").inc()
            raise
        return JSONResponse(fmt.answer(exchange.choices))

    async def _start_stream(self, request: Request, exchange: Exchange, fmt: AnswerFormat, include_usage: bool,
                            endpoint: str) -> Any:
        """Read until the first token, so that an error before it is still an HTTP status."""
        entries = exchange.entries()

        async def first_entries() -> list:
            early = []
            async for choice, entry in entries:
                early.append((choice, entry))
                if isinstance(entry, ErrorReply):
                    raise ApiError.from_reply(entry.code, entry.message)
                if isinstance(entry, TokenReply):
                    break
            return early

        early = await self._until_disconnect(request, exchange, first_entries())
        if isinstance(early, Response):
            return early

        async def on_abandon(reason: str) -> None:
            self.metrics.abandoned.labels(reason).inc()
            await exchange.abandon(reason)

        def on_close() -> None:
            self.metrics.calls.labels(endpoint, "200").inc()
            self._finish(exchange, endpoint)

        return EventStream(self._events(early, entries, exchange, fmt, include_usage), on_abandon, on_close)

    async def _events(self, early: list, entries, exchange: Exchange, fmt: AnswerFormat, include_usage: bool):
        if fmt.chat:  # OpenAI opens each choice of a chat stream with the role
            for choice in exchange.choices:
                yield sse(fmt.chunk(choice.index, "", role=True))

        async def all_entries():
            for item in early:
                yield item
            async for item in entries:
                yield item

        try:
            async for choice, entry in all_entries():
                if isinstance(entry, TokenReply):
                    if entry.text:
                        yield sse(fmt.chunk(choice.index, entry.text))
                elif isinstance(entry, ErrorReply):
                    raise ApiError.from_reply(entry.code, entry.message)
                else:
                    last = exchange.finished
                    yield sse(fmt.chunk(choice.index, None, entry.finish_reason,
                                        usage_counts=usage(exchange.choices) if last else None))
        except ApiError as error:  # after the first token the status is sent: the error is an event
            if error.status == 504:
                self.metrics.abandoned.labels("timeout").inc()
            await exchange.abandon("error")
            yield sse(error.body())
        else:
            if include_usage:
                yield sse(fmt.usage_chunk(exchange.choices))
        yield sse("[DONE]")
