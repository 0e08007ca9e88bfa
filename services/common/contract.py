"""The public wire contract (CONTRACT.md), version 1, as typed messages and strict validation.

Requests arrive as JSON objects on Kafka; this module turns their bytes into a validated
:class:`RequestMessage` or a :class:`RequestError` whose message is one sentence naming the field or limit
at fault. Unknown fields are ignored (forward compatibility). Steps, in the order ingest runs them:

1. :func:`read_envelope` - is it a JSON object with a readable ``id``? If not: dead-letter topic.
2. :func:`validate_request` - schema and ranges of every field (needs the model's vocab size).
3. tokenize, then :func:`check_prompt_fits` - prompt + max_tokens within the model's context.

Reply entries and the internal work item live in :mod:`lorafleet.common.messages`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from lorafleet.common.ids import validate_adapter_id

ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_REPLY_PREFIX = "lorafleet:out:"
# Internal per-request state of the reply writer; a user-chosen reply_stream may not land there.
RESERVED_KEY_PREFIX = "lorafleet:state:"
# SET lorafleet:cancel:<id> cancels a request (contract extension); not a reply_stream either.
CANCEL_KEY_PREFIX = "lorafleet:cancel:"
MAX_REPLY_STREAM_CHARS = 512
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # anything that fits in 64 bits
# The contract's bounds (docs/contract.md, "Limits"): no field value or size can make a service
# spend unbounded time or memory on one request, or fail on it.
MAX_MESSAGE_BYTES = 1 << 20  # a request message's value
MAX_NESTING = 32  # levels of JSON objects / arrays in one request
MAX_TOKENS_LIMIT = 1 << 20  # max_tokens (the model's context bounds it further)
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string
MAX_CHAT_MESSAGES = 1024  # `messages` of a chat request (extension)
MAX_ROLE_CHARS = 64


class ErrorCode:
    INVALID_REQUEST = "invalid_request"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    INVALID_ADAPTER = "invalid_adapter"
    PROMPT_TOO_LONG = "prompt_too_long"
    # Extension (compatible: a new code): a bug or an unrecoverable failure inside lorafleet.
    INTERNAL_ERROR = "internal_error"
    # Extensions: the request's deadline_ms passed / the client cancelled it (CANCEL_KEY_PREFIX).
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    OVERLOADED = "overloaded"  # shed: no token within the engine's queue limit; send it again later
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # the adapter's storage stayed unreachable; send it again later


class RequestError(Exception):
    """A request lorafleet answers with a terminal ``error`` entry instead of tokens."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a chat request (extension `messages`): rendered by the model's chat template."""

    role: str
    content: str


class RequestMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A validated request; exactly one of ``prompt`` / ``prompt_token_ids`` / ``messages`` is set
    and ``reply_stream`` is always resolved (never null)."""

    id: str
    reply_stream: str
    adapter: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    deadline_ms: int | None = None  # unix milliseconds by which the request must be finished


# A field's default, declared once (RequestMessage) and applied by validate_request.
DEFAULTS = {f.name: f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            for f in msgspec.structs.fields(RequestMessage) if f.name not in ("id", "reply_stream")}


class Envelope(msgspec.Struct, frozen=True):
    """What can be read of a raw message before validation: the id and the decoded object, or
    the reason it belongs in the dead-letter topic (``request_id`` None)."""

    request_id: str | None
    body: dict | None
    reason: str | None


def default_reply_stream(request_id: str) -> str:
    return DEFAULT_REPLY_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def deadline_problem(deadline_ms: int | None, now_s: float) -> str | None:
    """The error message when a request's deadline has passed at `now_s` (unix seconds)."""
    if deadline_ms is None or now_s * 1000 < deadline_ms:
        return None
    return f"the request's deadline_ms {deadline_ms} passed {now_s * 1000 - deadline_ms:.0f} ms ago."


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "\u2026"


def read_envelope(raw: bytes | None) -> Envelope:
    """Never raises: every message is either readable (an object with a valid id) or carries the
    reason it goes to the dead-letter topic."""
    if not raw:
        return Envelope(None, None, "empty message: the value must be a JSON object with an id")
    if len(raw) > MAX_MESSAGE_BYTES:
        return Envelope(None, None, f"message of {len(raw)} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Envelope(None, None, f"not valid UTF-8 JSON: {exc}")
    except RecursionError:
        return Envelope(None, None, f"JSON nested too deeply to read (the limit is {MAX_NESTING} levels)")
    if not isinstance(body, dict):
        return Envelope(None, None, f"not a JSON object: got a JSON {type(body).__name__}")
    if "id" not in body:
        return Envelope(None, body, "the object has no id field")
    request_id = body["id"]
    if not isinstance(request_id, str) or not ID_PATTERN.fullmatch(request_id):
        return Envelope(None, body, f"id {_show(request_id)} is not 1-128 characters of [A-Za-z0-9._:-]")
    return Envelope(request_id, body, None)


def parse_request_id(raw: bytes | None) -> tuple[str | None, str | None]:
    """``(id, None)`` when `raw` is a JSON object with a valid id, else ``(None, reason)``."""
    envelope = read_envelope(raw)
    return envelope.request_id, envelope.reason


def adapter_id_problem(value: str) -> str | None:
    """Why `value` is not a valid adapter id (CONTRACT.md section 3), or None when it is.
    One rule for the whole system: the adapter store's (services/adapter_store/ids.py)."""
    try:
        validate_adapter_id(value)
    except ValueError as exc:
        return str(exc)
    return None


def resolve_reply_stream(body: dict, request_id: str) -> str:
    """The stream that answers this request, even when the request is bad: its own valid
    ``reply_stream`` or else the default (so an invalid reply_stream still gets its error)."""
    value = body.get("reply_stream")
    if value is None or reply_stream_problem(value) is not None:
        return default_reply_stream(request_id)
    return value


def reply_stream_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REPLY_STREAM_CHARS:
        return f"reply_stream must be null or a string of 1-{MAX_REPLY_STREAM_CHARS} characters, got {_show(value)}"
    for prefix in (RESERVED_KEY_PREFIX, CANCEL_KEY_PREFIX):
        if value.startswith(prefix):
            return f"reply_stream must not start with the reserved prefix {prefix!r}"
    return None


def _invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_REQUEST, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _int_field(body: dict, name: str, minimum: int, maximum: int, limit: str) -> int:
    value = body.get(name, DEFAULTS[name])
    if not _is_int(value) or not minimum <= value <= maximum:
        raise _invalid(f"{name} must be an integer from {minimum} to {maximum} ({limit}), got {_show(value)}.")
    return value


def nesting_depth(value: Any, stop_above: int = MAX_NESTING) -> int:
    """Levels of dicts / lists in a decoded JSON value, iteratively (no recursion to overflow);
    stops counting once it passes `stop_above`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        deepest = max(deepest, depth)
        if deepest > stop_above:
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest if isinstance(value, (dict, list)) else 0


def _stop_field(body: dict) -> list[str]:
    stop = body.get("stop", DEFAULTS["stop"])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _invalid(f"stop must be a list of non-empty strings, got {_show(stop)}.")
    if len(stop) > MAX_STOP_STRINGS:
        raise _invalid(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}.")
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise _invalid(f"stop strings must be at most {MAX_STOP_CHARS} characters; one has {longest}.")
    return list(stop)  # never the shared default itself


PromptFields = tuple[str | None, list[int] | None, list[ChatMessage] | None]


def _prompt_fields(body: dict, vocab_size: int) -> PromptFields:
    prompt, token_ids, messages = body.get("prompt"), body.get("prompt_token_ids"), body.get("messages")
    if sum(value is not None for value in (prompt, token_ids, messages)) != 1:
        raise _invalid("exactly one of prompt, prompt_token_ids and messages must be given.")
    if messages is not None:
        return None, None, _messages_field(messages)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _invalid(f"prompt must be a string, got {_show(prompt)}.")
        return prompt, None, None
    if not isinstance(token_ids, list) or not token_ids:
        raise _invalid(f"prompt_token_ids must be a non-empty list of integers, got {_show(token_ids)}.")
    for position, token in enumerate(token_ids):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise _invalid(f"prompt_token_ids[{position}] must be an integer in [0, {vocab_size}) "
                           f"(the vocab size), got {_show(token)}.")
    return None, token_ids, None


def _messages_field(messages: Any) -> list[ChatMessage]:
    """`messages` (extension): 1-MAX_CHAT_MESSAGES objects with a `role` and a string `content`."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_CHAT_MESSAGES:
        raise _invalid(f"messages must be a list of 1-{MAX_CHAT_MESSAGES} objects, got {_show(messages)}.")
    parsed = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{position}] must be an object with role and content, got {_show(message)}.")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not 1 <= len(role) <= MAX_ROLE_CHARS:
            raise _invalid(f"messages[{position}].role must be a string of 1-{MAX_ROLE_CHARS} characters, "
                           f"got {_show(role)}.")
        if not isinstance(content, str):
            raise _invalid(f"messages[{position}].content must be a string, got {_show(content)}.")
        parsed.append(ChatMessage(role, content))
    return parsed


def validate_request(body: dict, request_id: str, *, vocab_size: int) -> RequestMessage:
    """Check every field of a request object whose id `read_envelope` already accepted.

    Raises RequestError(invalid_request, one sentence naming the field). The context-length check
    needs the token count, so it is :func:`check_prompt_fits`, run after tokenization.
    """
    depth = nesting_depth(body)
    if depth > MAX_NESTING:  # first: nothing below walks or shows a deeply nested value
        raise _invalid(f"the request nests more than {MAX_NESTING} levels of objects and arrays (the limit).")
    adapter = body.get("adapter")
    if adapter is not None:
        if not isinstance(adapter, str):
            raise _invalid(f"adapter must be null or an adapter id string, got {_show(adapter)}.")
        problem = adapter_id_problem(adapter)
        if problem:
            raise _invalid(problem + ".")
    prompt, token_ids, messages = _prompt_fields(body, vocab_size)
    max_tokens = _int_field(body, "max_tokens", 1, MAX_TOKENS_LIMIT, "the contract's limit")
    top_k = _int_field(body, "top_k", 0, vocab_size, "0: off; at most the vocab size")
    temperature = body.get("temperature", DEFAULTS["temperature"])
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise _invalid(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, got {_show(temperature)}.")
    top_p = body.get("top_p", DEFAULTS["top_p"])
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _invalid(f"top_p must be a number with 0 < top_p <= 1, got {_show(top_p)}.")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise _invalid(f"seed must be null or an integer that fits in 64 bits, got {_show(seed)}.")
    stop = _stop_field(body)
    ignore_eos = body.get("ignore_eos", DEFAULTS["ignore_eos"])
    if not isinstance(ignore_eos, bool):
        raise _invalid(f"ignore_eos must be true or false, got {_show(ignore_eos)}.")
    deadline_ms = body.get("deadline_ms")
    if deadline_ms is not None and (not _is_int(deadline_ms) or not 0 <= deadline_ms < 1 << 63):
        raise _invalid(f"deadline_ms must be null or unix milliseconds (an integer from 0 to 2**63 - 1), "
                       f"got {_show(deadline_ms)}.")
    reply_stream = body.get("reply_stream")
    if reply_stream is not None:
        problem = reply_stream_problem(reply_stream)
        if problem:
            raise _invalid(problem + ".")
    return RequestMessage(
        id=request_id,
        reply_stream=reply_stream if reply_stream is not None else default_reply_stream(request_id),
        adapter=adapter,
        prompt=prompt,
        prompt_token_ids=token_ids,
        messages=messages,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        deadline_ms=deadline_ms,
    )


def check_prompt_fits(prompt_tokens: int, max_tokens: int, context_len: int) -> None:
    """Raise prompt_too_long unless prompt + max_tokens fits the model's context; an empty prompt
    (a tokenizer that adds no BOS, given "") is invalid_request."""
    if prompt_tokens == 0:
        raise _invalid("prompt must encode to at least one token; it encodes to none.")
    if prompt_tokens + max_tokens > context_len:
        raise RequestError(
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {context_len} tokens.",
        )
