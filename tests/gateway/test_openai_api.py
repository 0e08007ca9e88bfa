"""OpenAI request bodies -> contract requests: types named by field, unsupported features refused
by name, the contract's own validation, and a decoder that no input can crash."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.common.contract import SEED_MAX, validate_request
from lorafleet.gateway.errors import STATUS_OF_CODE, ApiError
from lorafleet.gateway.openai_api import (
    ChatBody,
    CompletionBody,
    chat_prompts,
    completion_prompts,
    contract_requests,
    decode_body,
)


def _completion(**fields) -> CompletionBody:
    return decode_body(json.dumps({"model": "m", "prompt": "hi", **fields}).encode(), CompletionBody)


def _chat(**fields) -> ChatBody:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return decode_body(json.dumps(body).encode(), ChatBody)


def _requests(body, prompts, **options) -> list[dict]:
    defaults = dict(request_id="cmpl-x", adapter="t/a", max_tokens=body.max_tokens, deadline_ms=10**13, max_choices=64)
    return contract_requests(body, prompts, **{**defaults, **options})


def test_a_completion_becomes_one_contract_request_per_prompt_and_choice():
    body = _completion(prompt=["a", "b"], n=3, seed=7, stop="\n", temperature=0, max_tokens=5, top_k=2)
    requests = _requests(body, completion_prompts(body))
    assert [r["id"] for r in requests] == [f"cmpl-x-{i}" for i in range(6)]
    assert [r["prompt"] for r in requests] == ["a"] * 3 + ["b"] * 3
    assert [r["seed"] for r in requests] == [7, 8, 9] * 2  # choices differ; the first keeps the seed
    assert all(r["stop"] == ["\n"] and r["max_tokens"] == 5 and r["temperature"] == 0 and r["top_k"] == 2
               and r["adapter"] == "t/a" for r in requests)
    for r in requests:  # what ingest will accept
        validate_request(r, r["id"], vocab_size=100)


def test_token_id_prompts_and_openai_defaults():
    body = _completion(prompt=[[1, 2], [3]])
    requests = _requests(body, completion_prompts(body))
    assert [r["prompt_token_ids"] for r in requests] == [[1, 2], [3]]
    assert requests[0]["max_tokens"] == 16  # OpenAI's completions default
    assert "temperature" not in requests[0] and "seed" not in requests[0]  # the contract's defaults apply
    body = _completion(prompt=[5, 6, 7])
    assert completion_prompts(body) == [{"prompt_token_ids": [5, 6, 7]}]


def test_seed_of_the_last_choice_wraps_within_64_bits():
    body = _completion(seed=SEED_MAX, n=2)
    assert [r["seed"] for r in _requests(body, completion_prompts(body))] == [SEED_MAX, -(1 << 63)]


def test_chat_messages_become_the_contract_messages_field():
    body = _chat(messages=[{"role": "system", "content": "be brief"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                 max_completion_tokens=9)
    prompts = chat_prompts(body)
    assert prompts == [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]}]
    request = _requests(body, prompts, max_tokens=body.max_completion_tokens)[0]
    assert request["max_tokens"] == 9
    assert validate_request(request, request["id"], vocab_size=100).messages[1].content == "a\nb"


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "m", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    (b'{"model": "m", "prompt": "x", "n": 1.5}', "n"),
    (b'{"prompt": "x"}', "model"),
    (b'{"model": "m", "prompt": "x", "stop": [1]}', "stop[0]"),
])
def test_wrong_types_are_400_naming_the_field(raw, param):
    with pytest.raises(ApiError) as caught:
        decode_body(raw, CompletionBody)
    assert caught.value.status == 400
    assert caught.value.param == param
    if param:
        assert param.split("[")[0] in caught.value.message


@pytest.mark.parametrize("fields, param", [
    (dict(logprobs=2), "logprobs"), (dict(echo=True), "echo"), (dict(best_of=2), "best_of"),
    (dict(suffix="x"), "suffix"), (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(presence_penalty=-1), "presence_penalty"), (dict(logit_bias={"1": 3}), "logit_bias"),
])
def test_unsupported_completion_features_are_refused_by_name(fields, param):
    with pytest.raises(ApiError) as caught:
        completion_prompts(_completion(**fields))
    assert (caught.value.status, caught.value.param) == (400, param)
    assert "not supported" in caught.value.message


@pytest.mark.parametrize("fields, param", [
    (dict(logprobs=True), "logprobs"), (dict(tools=[{"type": "function"}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content"),
    (dict(messages=[{"role": "assistant", "content": None}]), "messages[0].content"),
    (dict(messages=[]), "messages"),
])
def test_unsupported_chat_features_are_refused_by_name(fields, param):
    with pytest.raises(ApiError) as caught:
        chat_prompts(_chat(**fields))
    assert (caught.value.status, caught.value.param) == (400, param)


@pytest.mark.parametrize("fields, words", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[""]), "stop"), (dict(stop=["s"] * 17), "stop"), (dict(top_k=-1), "top_k"),
])
def test_out_of_range_values_get_the_contracts_message(fields, words):
    body = _completion(**fields)
    with pytest.raises(ApiError) as caught:
        _requests(body, completion_prompts(body))
    assert caught.value.status == 400 and caught.value.code == "invalid_request"
    assert words in caught.value.message


def test_choices_are_bounded():
    body = _completion(prompt=["a"] * 8, n=9)
    with pytest.raises(ApiError) as caught:
        _requests(body, completion_prompts(body))
    assert caught.value.param == "n" and "64" in caught.value.message
    with pytest.raises(ApiError):
        _requests(_completion(n=0), [{"prompt": "a"}])


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [[1], "a"], [True, 2], {"a": 1}])
def test_prompts_of_no_openai_form_are_400(prompt):
    with pytest.raises(ApiError) as caught:
        completion_prompts(decode_body(json.dumps({"model": "m", "prompt": prompt}).encode(), CompletionBody))
    assert caught.value.param == "prompt"


def test_every_contract_code_has_a_status():
    assert STATUS_OF_CODE["adapter_not_found"] == 404 and STATUS_OF_CODE["invalid_request"] == 400
    assert STATUS_OF_CODE["prompt_too_long"] == 400 and STATUS_OF_CODE["overloaded"] == 429
    assert ApiError.from_reply("something_new", "x").status == 500
    assert ApiError(429, "m").body()["error"]["type"] == "rate_limit_error"


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json = st.recursive(_scalars,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_fields = st.dictionaries(st.sampled_from(["model", "prompt", "messages", "n", "stop", "seed", "max_tokens",
                                           "temperature", "top_p", "stream", "stream_options", "logprobs"]),
                          _json, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), _fields.map(lambda d: msgspec.json.encode(d))), st.booleans())
def test_no_body_crashes_the_decoder_or_the_conversion(raw, chat):
    """Whatever arrives is a typed body and contract requests, or a 400 ApiError; nothing else."""
    try:
        body = decode_body(raw, ChatBody if chat else CompletionBody)
        prompts = chat_prompts(body) if chat else completion_prompts(body)
        _requests(body, prompts, max_tokens=body.max_tokens)
    except ApiError as error:
        assert error.status == 400 and error.message
