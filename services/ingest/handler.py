"""What ingest does with one batch of request messages, from raw bytes to durable outcomes.

Each message ends in exactly one of three outcomes, all started concurrently and awaited
together, so a bad request costs the good ones nothing but a dictionary lookup:

    unreadable id            -> dead-letter topic (original key/value, reason headers; a value
                                over DLQ_VALUE_BYTES is cut there, with its size in a header)
    invalid / too long       -> one terminal `error` entry on its reply stream (ReplyWriter,
                                one Redis round trip for the whole batch)
    good                     -> WorkItem on the work topic, partition from the Router

No message can stop the service (NOTE invariant): a request id seen twice in one batch is served
once (the first); a per-message failure that retrying cannot fix (the broker refuses one work
item, Redis refuses one reply stream: WRONGTYPE) becomes that request's `error` entry, on the
default stream when its own reply_stream cannot be written, or else a reason-only dead letter (a
JSON object with the reason; also what a dead letter the broker refuses becomes). Only
infrastructure faults propagate: those that outlast the retry budget, and a dead-letter topic
that refuses even a reason-only dead letter (DeadLetterRefused).

The caller commits the batch's offsets only after :meth:`BatchHandler.handle` returns, i.e. after
every outcome is durable (Kafka acks=all, Redis write acknowledged). If anything fails the batch
is not committed and is delivered again; every outcome is idempotent downstream (engines and the
reply writer de-duplicate by request id), except that a dead letter may then appear twice.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable

import msgspec
from aiokafka import AIOKafkaProducer, ConsumerRecord

from lorafleet.common.contract import (
    ErrorCode,
    RequestError,
    RequestMessage,
    check_prompt_fits,
    deadline_problem,
    default_reply_stream,
    read_envelope,
    resolve_reply_stream,
    validate_request,
)
from lorafleet.common.kafka import is_transient_kafka_error, with_kafka_retries
from lorafleet.common.logging import request_logger
from lorafleet.common.messages import ErrorReply, WorkItem, encode_work_item, error_entry
from lorafleet.common.replies import ReplyWriter
from lorafleet.ingest.metrics import IngestMetrics
from lorafleet.ingest.prompts import PromptEncoder
from lorafleet.ingest.routing import Router

DLQ_VALUE_BYTES = 64 << 10  # dead letters keep this much of the original value (producer limit: 1 MiB)
WORK_ITEM_BYTES = 900 << 10  # a work item above this cannot be produced (producer limit: 1 MiB)

ErrorOut = tuple[str, str, ErrorReply]  # (reply stream, request id, entry)
_json = msgspec.json.Encoder()


class DeadLetterRefused(Exception):
    """The dead-letter topic refused a message's dead letter and its reason alone (a schema on the
    topic, say): nowhere to put the message yet, so its batch is not committed and is handled
    again, as in an outage, until the topic takes it."""


class BatchHandler:
    def __init__(self, *, encoder: PromptEncoder, writer: ReplyWriter, producer: AIOKafkaProducer,
                 router: Router, work_topic: str, dlq_topic: str, log: Any,
                 metrics: IngestMetrics | None = None) -> None:
        self.encoder = encoder
        self.writer = writer
        self.producer = producer
        self.router = router
        self.work_topic = work_topic
        self.dlq_topic = dlq_topic
        self.log = log
        self.counts = {"work": 0, "error": 0, "dead_letter": 0, "duplicate": 0}  # this run's, for the stop log
        self.metrics = metrics or IngestMetrics()  # what /metrics serves

    async def handle(self, records: list[ConsumerRecord]) -> None:
        """Route every record; returns once all outcomes are durable (raises otherwise)."""
        outcomes: list[Awaitable[Any]] = []
        errors: list[ErrorOut] = []
        valid: list[tuple[RequestMessage, ConsumerRecord]] = []
        records_by_id: dict[str, ConsumerRecord] = {}
        self.metrics.consumed.inc(len(records))
        for record in records:
            envelope = read_envelope(record.value)
            if envelope.request_id is None:
                outcomes.append(self._dead_letter(record, envelope.reason or "unreadable"))
                continue
            request_id = envelope.request_id
            if request_id in records_by_id:  # one outcome per id: the first delivery's
                self.counts["duplicate"] += 1
                self.metrics.duplicates.inc()
                continue
            records_by_id[request_id] = record
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
        chats = [request.messages for request, _ in valid if request.messages is not None]
        # Tokenizing can take milliseconds per long prompt: off the event loop, one call per batch.
        encoded_texts, encoded_chats = map(iter, await asyncio.to_thread(self._encode, texts, chats))
        received_at = time.time()
        sends = []
        for request, record in valid:
            if request.prompt is not None:
                token_ids = next(encoded_texts)
            elif request.messages is not None:
                token_ids = next(encoded_chats)
            else:
                token_ids = request.prompt_token_ids
            try:
                if isinstance(token_ids, RequestError):
                    raise token_ids
                check_prompt_fits(len(token_ids), request.max_tokens, self.encoder.limits.context_len)
                late = deadline_problem(request.deadline_ms, received_at)
                if late:
                    raise RequestError(ErrorCode.DEADLINE_EXCEEDED, late)
            except RequestError as exc:
                errors.append((request.reply_stream, request.id, error_entry(exc.code, exc.message)))
                continue
            submitted_at = record.timestamp / 1000 if record.timestamp and record.timestamp > 0 else received_at
            item = WorkItem.from_request(request, list(token_ids), submitted_at=submitted_at,
                                         received_at=received_at)
            sends.append(self._send_work(item))
        results = await asyncio.gather(*sends, *outcomes, self._reply_errors(errors, records_by_id))
        late = [failed for failed in results[:len(sends)] if failed is not None]
        if late:  # work items the broker refused: their requests end with an error entry instead
            await self._reply_errors(late, records_by_id)

    def _encode(self, texts: list[str], chats: list) -> tuple[list[list[int]], list]:
        return (self.encoder.encode_batch(texts) if texts else [],
                self.encoder.encode_chats(chats) if chats else [])

    async def _send_work(self, item: WorkItem) -> ErrorOut | None:
        """Produce one work item; its error entry instead when the broker refuses it for good."""
        partition, route = self.router.route_and_kind(item.id, item.adapter)
        value = encode_work_item(item)
        if len(value) > WORK_ITEM_BYTES:
            return (item.reply_stream, item.id, error_entry(
                ErrorCode.PROMPT_TOO_LONG, f"the request's {len(item.prompt_token_ids)} prompt tokens make a "
                f"{len(value)}-byte work message; the limit is {WORK_ITEM_BYTES} bytes."))
        refused = await self._produce("produce work item", self.work_topic, value, key=item.id.encode(),
                                      partition=partition)
        if refused is not None:
            self.log.error("work item refused", request_id=item.id, error=repr(refused))
            return (item.reply_stream, item.id, error_entry(
                ErrorCode.INTERNAL_ERROR, f"the broker refused the request's work message: {type(refused).__name__}."))
        self.counts["work"] += 1
        self.metrics.routed.labels(route).inc()
        request_logger(self.log, item.id, item.adapter).debug(
            "routed", partition=partition, prompt_tokens=len(item.prompt_token_ids))
        return None

    async def _produce(self, what: str, topic: str, value: bytes | None, **options: Any) -> Exception | None:
        """Produce one message and wait for the broker's ack, retrying transient errors; returns the
        error when the broker refuses this message for good, raises when the broker stays away
        past the retry budget (an infrastructure fault, not this message's)."""
        try:
            await with_kafka_retries(lambda: self.producer.send_and_wait(topic, value, **options), what)
        except Exception as exc:
            if is_transient_kafka_error(exc):
                raise
            return exc
        return None

    async def _reply_errors(self, errors: list[ErrorOut], records_by_id: dict[str, ConsumerRecord]) -> None:
        """Write the error entries; one whose reply_stream Redis refuses (another type of key
        there) goes to the default stream, and one that cannot be written at all to the DLQ."""
        if not errors:
            return
        states = await self.writer.publish(errors)
        self.counts["error"] += len(errors)
        for _, _, entry in errors:
            self.metrics.rejected.labels(entry.code).inc()
        retry: list[ErrorOut] = []
        for stream, request_id, entry in errors:
            state = states.get(request_id)
            self.log.info("request rejected", request_id=request_id, code=entry.code,
                          reason=entry.message, stream=stream,
                          write_error=state.error if state else None)
            if state is None or state.error is None:
                continue
            if stream != default_reply_stream(request_id):
                retry.append((default_reply_stream(request_id), request_id, error_entry(
                    ErrorCode.INVALID_REQUEST, f"reply_stream {stream[:80]!r} could not be written "
                    f"({state.error[:80]}); {entry.code}: {entry.message}"[:1000])))
            else:
                await self._dead_letter(records_by_id[request_id], f"its error entry could not be written to "
                                        f"{stream!r}: {state.error}; {entry.code}: {entry.message}"[:1000])
        if retry:
            await self._reply_errors(retry, records_by_id)

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        value = record.value
        headers = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        if value is not None and len(value) > DLQ_VALUE_BYTES:  # the original alone could exceed the limit
            headers += [("original_bytes", str(len(value)).encode()), ("truncated", b"1")]
            value = value[:DLQ_VALUE_BYTES]
        refused = await self._produce("produce dead letter", self.dlq_topic, value, key=record.key, headers=headers)
        if refused is not None:
            # the reason alone, without the body or key (what the broker refused is in there), as a
            # JSON object: what a dead-letter topic validating its records most likely admits
            self.log.error("dead letter refused; sending the reason alone", error=repr(refused), offset=record.offset)
            headers.append(("refused", type(refused).__name__.encode()))
            reason_only = _json.encode({"reason": reason, "refused": type(refused).__name__})
            again = await self._produce("produce dead letter (reason only)", self.dlq_topic, reason_only,
                                        headers=headers)
            if again is not None:
                raise DeadLetterRefused(f"{self.dlq_topic} refused the dead letter of {record.topic}/"
                                        f"{record.partition}@{record.offset} and its reason alone: {again!r}")
        self.counts["dead_letter"] += 1
        self.metrics.dead_lettered.inc()
        self.log.warning("dead letter", reason=reason, source_topic=record.topic,
                         partition=record.partition, offset=record.offset)
