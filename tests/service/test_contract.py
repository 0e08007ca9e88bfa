"""Request validation (CONTRACT.md section 1) and reply entries (section 2), field by field."""

from __future__ import annotations

import re

import msgspec
import pytest

from lorafleet.common.contract import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    RequestError,
    cancel_key,
    check_prompt_fits,
    deadline_problem,
    default_reply_stream,
    parse_request_id,
    read_envelope,
    resolve_reply_stream,
    validate_request,
)
from lorafleet.common.messages import (
    DoneReply,
    ErrorReply,
    TokenReply,
    WorkItem,
    decode_work_item,
    done_entry,
    encode_work_item,
    entry_fields,
    error_entry,
    parse_entry,
    token_entry,
)

VOCAB = 100


def validate(**fields):
    body = {"id": "r1", "prompt": "hi", **fields}
    body = {k: v for k, v in body.items() if v is not _ABSENT}
    return validate_request(body, "r1", vocab_size=VOCAB)


_ABSENT = object()


def test_defaults_of_a_minimal_request():
    request = validate()
    assert (request.adapter, request.prompt, request.prompt_token_ids) == (None, "hi", None)
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (256, 1.0, 1.0, 0)
    assert (request.seed, request.stop, request.ignore_eos) == (None, [], False)
    assert request.reply_stream == "lorafleet:out:r1" == default_reply_stream("r1")


def test_a_deadline_is_unix_milliseconds_compared_with_the_clock_in_seconds():
    assert deadline_problem(None, 1e12) is None
    assert deadline_problem(1_000_500, now_s=1000.4) is None  # 100 ms left
    assert deadline_problem(1_000_500, now_s=1000.5) == "the request's deadline_ms 1000500 passed 0 ms ago."
    assert deadline_problem(1_000_500, now_s=1000.75) == "the request's deadline_ms 1000500 passed 250 ms ago."


def test_every_field_given_and_unknown_fields_ignored():
    request = validate(adapter="tenant-a/sql-v3", prompt=_ABSENT, prompt_token_ids=[0, 5, 99],
                       max_tokens=3, temperature=0, top_p=0.5, top_k=7, seed=-3, stop=["\n", "END"],
                       ignore_eos=True, reply_stream="my:stream", future_field={"x": 1})
    assert request.adapter == "tenant-a/sql-v3" and request.prompt_token_ids == [0, 5, 99]
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (3, 0.0, 0.5, 7)
    assert (request.seed, request.stop, request.ignore_eos, request.reply_stream) == (
        -3, ["\n", "END"], True, "my:stream")
    assert isinstance(request.temperature, float)


def test_chat_messages_extension():
    turns = [{"role": "system", "content": ""}, {"role": "user", "content": "hi", "name": "ignored"}]
    request = validate(prompt=_ABSENT, messages=turns)
    assert [(m.role, m.content) for m in request.messages] == [("system", ""), ("user", "hi")]
    assert request.prompt is None and request.prompt_token_ids is None


@pytest.mark.parametrize("fields, names", [
    (dict(prompt=_ABSENT), "exactly one of prompt, prompt_token_ids and messages"),
    (dict(prompt_token_ids=[1]), "exactly one of prompt, prompt_token_ids and messages"),
    (dict(messages=[{"role": "user", "content": "hi"}]), "exactly one of prompt, prompt_token_ids and messages"),
    (dict(prompt=_ABSENT, messages=[]), "messages must be a list of 1-1024 objects"),
    (dict(prompt=_ABSENT, messages=[{"role": "user", "content": "x"}] * 1025), "messages must be a list of 1-1024"),
    (dict(prompt=_ABSENT, messages="hi"), "messages must be a list of 1-1024 objects"),
    (dict(prompt=_ABSENT, messages=["hi"]), "messages[0] must be an object with role and content"),
    (dict(prompt=_ABSENT, messages=[{"content": "x"}]), "messages[0].role must be a string of 1-64 characters"),
    (dict(prompt=_ABSENT, messages=[{"role": "r" * 65, "content": "x"}]), "messages[0].role must be a string"),
    (dict(prompt=_ABSENT, messages=[{"role": "user", "content": "x"}, {"role": "user", "content": None}]),
     "messages[1].content must be a string"),
    (dict(prompt=5), "prompt must be a string"),
    (dict(prompt=_ABSENT, prompt_token_ids=[]), "prompt_token_ids must be a non-empty list"),
    (dict(prompt=_ABSENT, prompt_token_ids="1 2"), "prompt_token_ids must be a non-empty list"),
    (dict(prompt=_ABSENT, prompt_token_ids=[1, VOCAB]), "prompt_token_ids[1] must be an integer in [0, 100)"),
    (dict(prompt=_ABSENT, prompt_token_ids=[-1]), "prompt_token_ids[0]"),
    (dict(prompt=_ABSENT, prompt_token_ids=[1.0]), "prompt_token_ids[0]"),
    (dict(prompt=_ABSENT, prompt_token_ids=[True]), "prompt_token_ids[0]"),
    (dict(adapter=7), "adapter must be null or an adapter id string"),
    (dict(adapter=""), "adapter id must not be empty"),
    (dict(adapter="a//b"), "segment 2 of adapter id"),
    (dict(adapter="/a"), "segment 1 of adapter id"),
    (dict(adapter="a/"), "segment 2 of adapter id"),
    (dict(adapter="a/../b"), "must not be '.' or '..'"),
    (dict(adapter="."), "must not be '.' or '..'"),
    (dict(adapter="a b"), "1-64 characters of [A-Za-z0-9._-]"),
    (dict(adapter="x" * 65), "1-64 characters"),
    (dict(max_tokens=0), "max_tokens must be an integer from 1 to 1048576"),
    (dict(max_tokens=2.0), "max_tokens must be an integer from 1 to 1048576"),
    (dict(max_tokens=True), "max_tokens must be an integer from 1 to 1048576"),
    (dict(max_tokens=None), "max_tokens must be an integer from 1 to 1048576"),
    (dict(temperature=-0.1), "temperature must be a number from 0 to 100"),
    (dict(temperature="1"), "temperature must be a number from 0 to 100"),
    (dict(temperature=float("inf")), "temperature must be a number from 0 to 100"),
    (dict(temperature=float("nan")), "temperature must be a number from 0 to 100"),
    (dict(top_p=0), "top_p must be a number with 0 < top_p <= 1"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=False), "top_p"),
    (dict(top_k=-1), "top_k must be an integer from 0 to 100 (0: off; at most the vocab size)"),
    (dict(top_k=VOCAB + 1), "top_k must be an integer from 0 to 100"),
    (dict(top_k=1 << 63), "top_k must be an integer from 0 to 100"),
    (dict(max_tokens=1 << 63), "max_tokens must be an integer from 1 to 1048576 (the contract's limit)"),
    (dict(temperature=100.5), "temperature must be a number from 0 to 100"),
    (dict(stop=["x"] * 17), "stop has 17 strings; the limit is 16"),
    (dict(stop=["x" * 257]), "stop strings must be at most 256 characters; one has 257"),
    (dict(extra=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]),
     "the request nests more than 32 levels of objects and arrays (the limit)"),
    (dict(top_k=1.5), "top_k"),
    (dict(seed="42"), "seed must be null or an integer that fits in 64 bits"),
    (dict(seed=1 << 64), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(stop="END"), "stop must be a list of non-empty strings"),
    (dict(stop=["a", 1]), "stop must be a list"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
    (dict(ignore_eos=1), "ignore_eos must be true or false"),
    (dict(ignore_eos="true"), "ignore_eos"),
    (dict(reply_stream=""), "reply_stream must be null or a string of 1-512 characters"),
    (dict(reply_stream=3), "reply_stream"),
    (dict(reply_stream="x" * 513), "reply_stream"),
    (dict(reply_stream="lorafleet:state:r2"), "reserved prefix"),
    (dict(reply_stream="lorafleet:cancel:r2"), "reserved prefix 'lorafleet:cancel:'"),
    (dict(deadline_ms=-1), "deadline_ms must be null or unix milliseconds"),
    (dict(deadline_ms=1.5e12), "deadline_ms must be null or unix milliseconds"),
    (dict(deadline_ms=1 << 63), "deadline_ms"),
])
def test_invalid_fields_name_the_field(fields, names):
    with pytest.raises(RequestError) as info:
        validate(**fields)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert names in info.value.message
    assert info.value.message.count(". ") == 0  # one sentence


def test_boundaries_that_are_valid():
    assert validate(max_tokens=1).max_tokens == 1
    assert validate(deadline_ms=1_700_000_000_000).deadline_ms == 1_700_000_000_000
    assert validate(max_tokens=1 << 20).max_tokens == 1 << 20
    assert validate(top_k=VOCAB).top_k == VOCAB and validate(temperature=100).temperature == 100.0
    assert validate(stop=["x" * 256] * 16).stop == ["x" * 256] * 16
    assert validate(extra=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]).id  # 32 levels with the request
    assert validate(top_p=1).top_p == 1.0
    assert validate(top_p=1e-9).top_p == 1e-9
    assert validate(seed=(1 << 64) - 1).seed == (1 << 64) - 1
    assert validate(seed=None, adapter=None, reply_stream=None).reply_stream == "lorafleet:out:r1"
    assert validate(adapter="a.b/c_d-e/" + "z" * 64).adapter.endswith("z" * 64)
    assert validate(prompt="").prompt == ""  # the tokenizer's BOS makes it non-empty


def test_the_limits_are_exact():
    """Each limit's last valid value and first invalid one (mutation testing found these unpinned)."""
    assert validate(reply_stream="x").reply_stream == "x"
    assert validate(reply_stream="x" * 512).reply_stream == "x" * 512
    turn = {"role": "u", "content": ""}
    assert len(validate(prompt=_ABSENT, messages=[turn]).messages) == 1
    assert len(validate(prompt=_ABSENT, messages=[turn] * 1024).messages) == 1024
    assert validate(prompt=_ABSENT, messages=[{"role": "r" * 64, "content": "x"}]).messages[0].role == "r" * 64
    assert validate(deadline_ms=0).deadline_ms == 0 and validate(deadline_ms=(1 << 63) - 1).deadline_ms == (1 << 63) - 1
    for fields, words in [(dict(reply_stream="x" * 513), "reply_stream"), (dict(reply_stream=""), "reply_stream"),
                          (dict(prompt=_ABSENT, messages=[{"role": "", "content": "x"}]), "messages[0].role"),
                          (dict(deadline_ms=-1), "deadline_ms"), (dict(deadline_ms=1 << 63), "deadline_ms"),
                          (dict(extra=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]), "32 levels")]:
        with pytest.raises(RequestError, match=re.escape(words)):
            validate(**fields)


def test_the_reserved_keys_of_a_request():
    assert default_reply_stream("r1") == "lorafleet:out:r1" and cancel_key("r1") == "lorafleet:cancel:r1"


def test_a_message_of_exactly_the_size_limit_is_read():
    envelope = b'{"id": "r1", "prompt": "'
    raw = envelope + b"a" * (MAX_MESSAGE_BYTES - len(envelope) - 2) + b'"}'
    assert len(raw) == MAX_MESSAGE_BYTES and read_envelope(raw).request_id == "r1"
    assert "exceeds the limit" in read_envelope(raw[:-2] + b'a"}').reason


def test_validated_requests_are_frozen():
    request = validate()
    with pytest.raises(AttributeError):
        request.max_tokens = 5
    with pytest.raises(AttributeError):
        validate(prompt=_ABSENT, messages=[{"role": "u", "content": "x"}]).messages[0].role = "system"
    with pytest.raises(AttributeError):
        read_envelope(b'{"id": "r1"}').request_id = "r2"


def test_prompt_fits_the_context():
    check_prompt_fits(10, 54, 64)
    with pytest.raises(RequestError) as info:
        check_prompt_fits(10, 55, 64)
    assert info.value.code == ErrorCode.PROMPT_TOO_LONG
    assert "prompt (10 tokens) + max_tokens (55) exceeds the model's context of 64 tokens" in info.value.message
    with pytest.raises(RequestError) as info:
        check_prompt_fits(0, 1, 64)
    assert info.value.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty message"),
    (None, "empty message"),
    (b"not json", "not valid UTF-8 JSON"),
    (b'{"id": "a"', "not valid UTF-8 JSON"),
    (b'{"id": "\xff"}', "not valid UTF-8 JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"r1"', "not a JSON object"),
    (b'{"prompt": "x"}', "no id field"),
    (b'{"id": 5}', "is not 1-128 characters"),
    (b'{"id": ""}', "is not 1-128 characters"),
    (b'{"id": "a b"}', "is not 1-128 characters"),
    (b'{"id": "' + b"x" * 129 + b'"}', "is not 1-128 characters"),
    # a 4 KB message nested 2,000 levels deep: msgspec raises RecursionError while decoding
    (b'{"id": "deep", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "JSON nested too deeply to read"),
    (b'{"id": "big", "prompt": "' + b"x" * (1 << 20) + b'"}', f"bytes exceeds the limit of {1 << 20} bytes"),
])
def test_unreadable_ids_give_a_reason(raw, reason):
    request_id, why = parse_request_id(raw)
    assert request_id is None and reason in why


def test_readable_ids():
    assert parse_request_id(b'{"id": "A-z.0_9:x"}') == ("A-z.0_9:x", None)
    long_id = "x" * 128
    assert parse_request_id(msgspec.json.encode({"id": long_id, "max_tokens": -5})) == (long_id, None)


def test_errors_go_to_the_default_stream_when_reply_stream_is_bad():
    assert resolve_reply_stream({"reply_stream": 5}, "r9") == "lorafleet:out:r9"
    assert resolve_reply_stream({"reply_stream": "lorafleet:state:r9"}, "r9") == "lorafleet:out:r9"
    assert resolve_reply_stream({"reply_stream": "mine"}, "r9") == "mine"
    assert read_envelope(b'{"id": "r9"}').body == {"id": "r9"}


def test_reply_entries_round_trip_through_flat_string_maps():
    token = token_entry("h\u00e9", [5, 6], index=3)
    assert entry_fields(token) == {"type": "token", "text": "h\u00e9", "token_ids": "[5,6]", "index": "3"}
    done = done_entry("length", 4, 7)
    assert entry_fields(done) == {"type": "done", "finish_reason": "length", "prompt_tokens": "4",
                                  "completion_tokens": "7"}
    error = error_entry("prompt_too_long", "prompt is long.")
    assert entry_fields(error) == {"type": "error", "code": "prompt_too_long", "message": "prompt is long."}
    for entry in (token, done, error):
        as_bytes = {k.encode(): v.encode() for k, v in entry_fields(entry).items()}
        assert parse_entry(as_bytes) == entry
    assert parse_entry({"type": "token", "text": "", "token_ids": "[1]"}) == TokenReply("", [1], -1)
    with pytest.raises(ValueError):
        done_entry("eos", 1, 1)
    with pytest.raises(ValueError):
        parse_entry({"type": "done", "finish_reason": "stop"})
    with pytest.raises(ValueError):
        parse_entry({"type": "bogus"})
    assert isinstance(parse_entry(entry_fields(done)), DoneReply)
    assert isinstance(parse_entry(entry_fields(error)), ErrorReply)


def test_work_item_round_trip():
    request = validate(adapter="a/b", seed=7, stop=["x"])
    item = WorkItem.from_request(request, [1, 2, 3], submitted_at=1.5, received_at=2.5)
    back = decode_work_item(encode_work_item(item))
    assert back == item and back.prompt_token_ids == [1, 2, 3] and back.reply_stream == "lorafleet:out:r1"
    with pytest.raises(msgspec.DecodeError):
        decode_work_item(b'{"id": "x"}')
