"""Property tests of the request decoder and validator: over arbitrary bytes and arbitrary JSON,
nothing escapes. Every message is a valid RequestMessage, a RequestError (an `error` entry with a
contract code and a one-line message), or a dead-letter reason: the three outcomes ingest has."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.common.contract import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    RequestMessage,
    RequestError,
    read_envelope,
    resolve_reply_stream,
    validate_request,
)

VOCAB = 1000
CODES = {ErrorCode.INVALID_REQUEST, ErrorCode.ADAPTER_NOT_FOUND, ErrorCode.INVALID_ADAPTER, ErrorCode.PROMPT_TOO_LONG}

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                           max_leaves=40)
FIELDS = ["id", "adapter", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "ignore_eos", "reply_stream"]
# Mostly-plausible requests: known fields with arbitrary values, so validation goes deep.
requests = st.fixed_dictionaries({"id": st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True)},
                                 optional={name: json_values for name in FIELDS[1:]}) | \
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8)


def outcome(raw: bytes):
    """What ingest does with one message value, minus the I/O: never raises."""
    envelope = read_envelope(raw)
    if envelope.request_id is None:
        assert isinstance(envelope.reason, str) and envelope.reason
        return "dead_letter"
    stream = resolve_reply_stream(envelope.body, envelope.request_id)
    assert isinstance(stream, str) and stream
    try:
        request = validate_request(envelope.body, envelope.request_id, vocab_size=VOCAB)
    except RequestError as exc:
        assert exc.code in CODES and exc.message and "\n" not in exc.message
        return "error"
    assert isinstance(request, RequestMessage) and request.id == envelope.request_id
    assert (request.prompt is None) != (request.prompt_token_ids is None)
    assert 0 <= request.top_k <= VOCAB and 1 <= request.max_tokens
    msgspec.json.encode(request)  # what ingest forwards must encode
    return "valid"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw):
    assert outcome(raw) in {"dead_letter", "error", "valid"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json(value):
    assert outcome(msgspec.json.encode(value)) in {"dead_letter", "error", "valid"}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_request_shaped_json(body):
    assert outcome(msgspec.json.encode(body)) in {"dead_letter", "error", "valid"}


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from([b"[", b'{"a":']))
def test_any_nesting_depth(depth, opener):
    closer = b"]" if opener == b"[" else b"}"
    raw = b'{"id": "n", "prompt": "x", "extra": ' + opener * depth + b"1" + closer * depth + b"}"
    assert outcome(raw) in {"dead_letter", "error", "valid"}


def test_size_limit_is_checked_before_decoding():
    raw = b'{"id": "r", "prompt": "' + b"a" * MAX_MESSAGE_BYTES + b'"}'
    assert read_envelope(raw).request_id is None
