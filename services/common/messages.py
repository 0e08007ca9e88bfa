"""Typed messages after validation: the work item ingest sends to engines, and reply entries.

Reply entries (CONTRACT.md section 2) are flat maps of strings in a Redis stream. Extension
(compatible: a new field): every ``token`` entry also carries ``index``, the number of tokens of
this request published before it, in decimal. Concatenating token_ids in stream order stays the
whole output; ``index`` lets the reply writer drop an entry it already wrote when a request is
served twice (Kafka redelivery), and lets a reader check it missed nothing.
"""

from __future__ import annotations

from typing import Mapping, Union

import msgspec

from lorafleet.common.contract import RequestMessage


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """One validated, tokenized request on the engines' work topic (JSON value, key = partition
    routing key). ``prompt_token_ids`` is what the engine feeds the model, as is."""

    id: str
    adapter: str | None
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    reply_stream: str
    submitted_at: float  # unix seconds: the request's Kafka record timestamp (the producer's clock)
    received_at: float  # unix seconds: when ingest read it
    deadline_ms: int | None = None  # unix milliseconds: past it the request ends with deadline_exceeded

    @classmethod
    def from_request(cls, request: RequestMessage, prompt_token_ids: list[int], *,
                     submitted_at: float, received_at: float) -> "WorkItem":
        return cls(
            id=request.id, adapter=request.adapter, prompt_token_ids=prompt_token_ids,
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k, seed=request.seed, stop=list(request.stop),
            ignore_eos=request.ignore_eos, reply_stream=request.reply_stream,
            submitted_at=submitted_at, received_at=received_at, deadline_ms=request.deadline_ms,
        )


_work_encoder = msgspec.json.Encoder()
_work_decoder = msgspec.json.Decoder(WorkItem)


def encode_work_item(item: WorkItem) -> bytes:
    return _work_encoder.encode(item)


def decode_work_item(raw: bytes) -> WorkItem:
    """Raises msgspec.DecodeError / ValidationError on a malformed value (a lorafleet bug or a
    foreign producer on the internal topic)."""
    return _work_decoder.decode(raw)


class TokenReply(msgspec.Struct, frozen=True):
    text: str  # a text delta; may be empty while a multi-byte character is incomplete
    token_ids: list[int]
    index: int  # tokens of this request published before this entry (extension, see module doc)


class DoneReply(msgspec.Struct, frozen=True):
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class ErrorReply(msgspec.Struct, frozen=True):
    code: str
    message: str


ReplyEntry = Union[TokenReply, DoneReply, ErrorReply]


def token_entry(text: str, token_ids: list[int], index: int) -> TokenReply:
    return TokenReply(text=text, token_ids=list(token_ids), index=index)


def done_entry(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> DoneReply:
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
    return DoneReply(finish_reason, prompt_tokens, completion_tokens)


def error_entry(code: str, message: str) -> ErrorReply:
    return ErrorReply(code, message)


def is_terminal(entry: ReplyEntry) -> bool:
    return not isinstance(entry, TokenReply)


class TokenIndexFilter:
    """A reader's view of one reply stream's token entries: each token once. After a Redis restart
    the engine publishes again from the first lost token, so a reader may see entries it has read
    already; their `index` (tokens published before the entry) says so."""

    def __init__(self) -> None:
        self.next_index = 0

    def is_new(self, entry: ReplyEntry) -> bool:
        """False for a token entry read already; True for anything else (terminal entries, and
        token entries without an index: a writer without the extension)."""
        if not isinstance(entry, TokenReply) or entry.index < 0:
            return True
        if entry.index < self.next_index:
            return False
        self.next_index = entry.index + len(entry.token_ids)
        return True


def token_fields(entry: TokenReply) -> list[str]:
    """entry_fields of a token entry as [field, value, ...]: the writer's per-token hot path."""
    return ["type", "token", "text", entry.text, "token_ids", _work_encoder.encode(entry.token_ids).decode(),
            "index", str(entry.index)]


def entry_fields(entry: ReplyEntry) -> dict[str, str]:
    """The flat string map written to the stream (field order is the one in CONTRACT.md)."""
    if isinstance(entry, TokenReply):
        fields = token_fields(entry)
        return dict(zip(fields[::2], fields[1::2]))
    if isinstance(entry, DoneReply):
        return {"type": "done", "finish_reason": entry.finish_reason,
                "prompt_tokens": str(entry.prompt_tokens),
                "completion_tokens": str(entry.completion_tokens)}
    return {"type": "error", "code": entry.code, "message": entry.message}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_entry(fields: Mapping[bytes | str, bytes | str]) -> ReplyEntry:
    """Inverse of :func:`entry_fields` for what a subscriber reads back; raises ValueError on an
    entry that is not a contract entry. A token entry without ``index`` (a writer that does not
    implement the extension) gets index -1."""
    data = {_text(k): _text(v) for k, v in fields.items()}
    kind = data.get("type")
    try:
        if kind == "token":
            return TokenReply(data["text"], msgspec.json.decode(data["token_ids"], type=list[int]),
                              int(data.get("index", "-1")))
        if kind == "done":
            return DoneReply(data["finish_reason"], int(data["prompt_tokens"]),
                             int(data["completion_tokens"]))
        if kind == "error":
            return ErrorReply(data["code"], data["message"])
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        raise ValueError(f"malformed {kind} reply entry {data!r}: {exc}") from None
    raise ValueError(f"reply entry has unknown type {kind!r}")
