"""What ingest does with one batch of request messages, from raw bytes to durable outcomes.

Each message ends in exactly one of three outcomes, all started concurrently and awaited
together, so a bad request costs the good ones nothing but a dictionary lookup:

    unreadable id            -> dead-letter topic (original key/value, reason headers)
    invalid / too long       -> one terminal `error` entry on its reply stream (ReplyWriter,
                                one Redis round trip for the whole batch)
    good                     -> WorkItem on the work topic, partition from the Router

The caller commits the batch's offsets only after :meth:`BatchHandler.handle` returns, i.e. after
every outcome is durable (Kafka acks=all, Redis write acknowledged). If anything fails the batch
is not committed and is delivered again; every outcome is idempotent downstream (engines and the
reply writer de-duplicate by request id), except that a dead letter may then appear twice.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable

from aiokafka import AIOKafkaProducer, ConsumerRecord

from lorafleet.common.contract import (
    ErrorCode,
    Request,
    RequestError,
    check_prompt_fits,
    read_envelope,
    resolve_reply_stream,
    validate_request,
)
from lorafleet.common.kafka import with_kafka_retries
from lorafleet.common.logging import request_logger
from lorafleet.common.messages import ErrorReply, WorkItem, encode_work_item, error_entry
from lorafleet.common.replies import ReplyWriter
from lorafleet.ingest.prompts import PromptEncoder
from lorafleet.ingest.routing import Router


class BatchHandler:
    def __init__(self, *, encoder: PromptEncoder, writer: ReplyWriter, producer: AIOKafkaProducer,
                 router: Router, work_topic: str, dlq_topic: str, log: Any) -> None:
        self.encoder = encoder
        self.writer = writer
        self.producer = producer
        self.router = router
        self.work_topic = work_topic
        self.dlq_topic = dlq_topic
        self.log = log
        self.counts = {"work": 0, "error": 0, "dead_letter": 0}

    async def handle(self, records: list[ConsumerRecord]) -> None:
        """Route every record; returns once all outcomes are durable (raises otherwise)."""
        outcomes: list[Awaitable[Any]] = []
        errors: list[tuple[str, str, ErrorReply]] = []
        valid: list[tuple[Request, ConsumerRecord]] = []
        for record in records:
            envelope = read_envelope(record.value)
            if envelope.request_id is None:
                outcomes.append(self._dead_letter(record, envelope.reason or "unreadable"))
                continue
            request_id = envelope.request_id
            stream = resolve_reply_stream(envelope.body or {}, request_id)
            try:
                valid.append((validate_request(envelope.body or {}, request_id,
                                               vocab_size=self.encoder.limits.vocab_size), record))
            except RequestError as exc:
                errors.append((stream, request_id, error_entry(exc.code, exc.message)))
            except Exception as exc:  # a bug must not take the batch (or the service) down
                self.log.exception("validation crashed", request_id=request_id)
                errors.append((stream, request_id, error_entry(
                    ErrorCode.INTERNAL_ERROR, f"lorafleet could not validate the request: {type(exc).__name__}.")))
        texts = [request.prompt for request, _ in valid if request.prompt is not None]
        # Tokenizing can take milliseconds per long prompt: off the event loop, one call per batch.
        encoded = iter(await asyncio.to_thread(self.encoder.encode_batch, texts) if texts else [])
        received_at = time.time()
        for request, record in valid:
            token_ids = request.prompt_token_ids if request.prompt is None else next(encoded)
            try:
                check_prompt_fits(len(token_ids), request.max_tokens, self.encoder.limits.context_len)
            except RequestError as exc:
                errors.append((request.reply_stream, request.id, error_entry(exc.code, exc.message)))
                continue
            submitted_at = record.timestamp / 1000 if record.timestamp and record.timestamp > 0 else received_at
            item = WorkItem.from_request(request, list(token_ids), submitted_at=submitted_at,
                                         received_at=received_at)
            outcomes.append(self._send_work(item))
        if errors:
            outcomes.append(self._reply_errors(errors))
        await asyncio.gather(*outcomes)

    async def _send_work(self, item: WorkItem) -> None:
        partition = self.router.route(item.id, item.adapter)
        value = encode_work_item(item)
        await with_kafka_retries(
            lambda: self.producer.send_and_wait(self.work_topic, value, key=item.id.encode(),
                                                partition=partition),
            "produce work item")
        self.counts["work"] += 1
        request_logger(self.log, item.id, item.adapter).debug(
            "routed", partition=partition, prompt_tokens=len(item.prompt_token_ids))

    async def _reply_errors(self, errors: list[tuple[str, str, ErrorReply]]) -> None:
        states = await self.writer.publish(errors)
        self.counts["error"] += len(errors)
        for stream, request_id, entry in errors:
            state = states.get(request_id)
            self.log.info("request rejected", request_id=request_id, code=entry.code,
                          reason=entry.message, stream=stream,
                          write_error=state.error if state else None)

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        await with_kafka_retries(
            lambda: self.producer.send_and_wait(self.dlq_topic, record.value, key=record.key,
                                                headers=headers),
            "produce dead letter")
        self.counts["dead_letter"] += 1
        self.log.warning("dead letter", reason=reason, source_topic=record.topic,
                         partition=record.partition, offset=record.offset)
