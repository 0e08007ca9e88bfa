"""One work item's life in the engine service, and the mapping of engine refusals to error codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from lorafleet.common.contract import ErrorCode, deadline_problem
from lorafleet.common.logging import request_logger
from lorafleet.common.messages import WorkItem
from lorafleet.engine.request import SamplingParams
from lorafleet.formats.lora_weights import LoraWeights


@dataclass(eq=False)
class Job:
    item: WorkItem
    deliveries: list[tuple[TopicPartition, int]]  # every Kafka message carrying this request id
    already_published: int = 0  # tokens in the reply stream before this delivery (redelivery)
    log: Any = None
    adapter: LoraWeights | None = None
    terminal_queued: bool = False  # its done/error entry is in the outbox
    stream: str = ""  # where its entries go: the item's reply_stream, or the default one after Redis refused that
    history: list = field(default_factory=list)  # every token entry made, in index order (re-published after a loss)
    terminal: Any = None  # its done/error entry once made
    settled: bool = False  # its terminal entry is written (or it is given up): its offsets may be committed
    admitted: bool = False  # handed to the engine (add_request succeeded)
    last_output_at: float = 0.0  # time.time() of its last output (inter-token latency)
    first_token_at: float = 0.0  # time.time() of its first token (the request-done log)

    def __post_init__(self) -> None:
        self.log = request_logger(self.log, self.item.id, self.item.adapter)
        self.stream = self.stream or self.item.reply_stream

    def expired(self, now: float, max_queue_s: float) -> tuple[str, str] | None:
        """(code, message) when this job must end now: its deadline_ms passed, or it has no token
        `max_queue_s` after ingest took it (load shedding); None otherwise."""
        if self.terminal_queued:
            return None
        late = deadline_problem(self.item.deadline_ms, now)
        if late:
            return ErrorCode.DEADLINE_EXCEEDED, late
        if not self.history and now - self.item.received_at > max_queue_s:
            return ErrorCode.OVERLOADED, (f"no token within {max_queue_s:g} s of ingest taking the request: "
                                          "the engines are overloaded; send it again later.")
        return None

    def entries_from(self, published: int) -> list:
        """What to write again when the stream holds only `published` of this job's tokens: its
        token entries from there on, then its terminal entry if made; empty when the stream's
        count is not one of this job's entry boundaries (another engine's race, not a loss)."""
        lost = [entry for entry in self.history if entry.index >= published]
        made = self.history[-1].index + len(self.history[-1].token_ids) if self.history else 0
        if (lost[0].index if lost else made) != published:
            return []
        return lost + ([self.terminal] if self.terminal is not None else [])


def sampling_params(item: WorkItem) -> SamplingParams:
    return SamplingParams(
        max_tokens=item.max_tokens, temperature=item.temperature, top_p=item.top_p, top_k=item.top_k,
        seed=item.seed, stop=tuple(item.stop), ignore_eos=item.ignore_eos,
    )


def engine_error_code(exc: ValueError) -> str:
    """The contract's code for a request the engine refused at add_request."""
    text = str(exc)
    if "context" in text or "pages" in text:
        return "prompt_too_long"
    return "invalid_request"


def done_latencies(job: Job, tokens: int, now: float) -> dict[str, float | None]:
    """The request-done log's figures (seconds from ingest taking the request; this delivery's
    tokens per second after the first)."""
    received = job.item.received_at
    first = job.first_token_at or None
    decode_s = now - first if first else 0.0
    return {"first_token_s": round(first - received, 4) if first else None, "total_s": round(now - received, 4),
            "tokens_per_s": round((tokens - 1) / decode_s, 2) if first and decode_s > 0 and tokens > 1 else None}
