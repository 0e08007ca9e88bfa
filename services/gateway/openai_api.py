"""OpenAI request bodies (completions, chat completions) -> contract requests.

The bodies are typed (msgspec: a wrong type names its field, `$.max_tokens`), unknown fields are
ignored as OpenAI's own server does, and a feature lorafleet does not have (log probabilities,
penalties, tools, echo) is refused by name instead of silently ignored. Each prompt of a request
times `n` becomes one contract request, `<request id>-<choice index>`; the contract's own
validation (docs/contract.md) then runs here too, so a bad value is a 400 before anything is sent.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from lorafleet.common.contract import SEED_MAX, SEED_MIN, RequestError, validate_request
from lorafleet.gateway.errors import ApiError

# msgspec's messages: "... - at `$.max_tokens`", "Object missing required field `model`"
_PARAM = re.compile(r"at `\$\.([^`]+)`|missing required field `([^`]+)`")
# The gateway does not know the vocabulary; ingest checks token ids and top_k against the real one.
_ANY_VOCAB = 1 << 31


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    """What both endpoints share. Defaults are OpenAI's (temperature 1, top_p 1, n 1)."""

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions vLLM also takes
    top_k: int | None = None
    ignore_eos: bool = False


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a list of either (a batch)
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatTurn(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatBody(_Sampling, kw_only=True):
    messages: list[ChatTurn]
    max_tokens: int | None = None  # absent: the contract's default
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def decode_body(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        found = _PARAM.search(str(exc))
        param = found.group(1) or found.group(2) if found else None
        raise ApiError(400, f"invalid request body: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _refuse_unsupported(body: _Sampling, extra: dict[str, bool]) -> None:
    common = {
        "frequency_penalty": bool(body.frequency_penalty), "presence_penalty": bool(body.presence_penalty),
        "logit_bias": bool(body.logit_bias),
    }
    for param, used in {**common, **extra}.items():
        if used:
            raise ApiError(400, f"{param} is not supported by lorafleet.", param=param)


def _prompts(prompt: str | list[Any]) -> list[dict]:
    """The prompt forms OpenAI takes, each as the contract field it becomes."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [{"prompt_token_ids": prompt}]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if prompt and all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                      for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of either.", param="prompt")


def _content_text(turn: ChatTurn, position: int) -> str:
    if turn.content is None:
        raise ApiError(400, f"messages[{position}].content must be given (tool calls are not supported).",
                       param=f"messages[{position}].content")
    if isinstance(turn.content, str):
        return turn.content
    texts = []
    for part in turn.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{position}].content: only text parts are supported, got {part.type!r}.",
                           param=f"messages[{position}].content")
        texts.append(part.text)
    return "\n".join(texts)  # as vLLM joins text parts


def completion_prompts(body: CompletionBody) -> list[dict]:
    _refuse_unsupported(body, {"echo": body.echo, "logprobs": body.logprobs is not None,
                               "best_of": (body.best_of or 1) > 1, "suffix": bool(body.suffix)})
    return _prompts(body.prompt)


def chat_prompts(body: ChatBody) -> list[dict]:
    format_type = (body.response_format or {}).get("type", "text")
    _refuse_unsupported(body, {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs is not None,
                               "tools": bool(body.tools), "response_format": format_type != "text"})
    if not body.messages:
        raise ApiError(400, "messages must hold at least one message.", param="messages")
    return [{"messages": [{"role": turn.role, "content": _content_text(turn, i)}
                          for i, turn in enumerate(body.messages)]}]


def contract_requests(body: _Sampling, prompts: list[dict], *, request_id: str, adapter: str | None,
                      max_tokens: int | None, deadline_ms: int, max_choices: int) -> list[dict]:
    """One contract request per prompt and choice (prompt-major: choice index = prompt * n + j),
    validated by the contract's own rules."""
    if body.n < 1 or len(prompts) * body.n > max_choices:
        raise ApiError(400, f"n ({body.n}) times the prompts ({len(prompts)}) must be 1 to {max_choices} "
                       "(this gateway's limit).", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    requests = []
    for p, prompt in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            request = {"id": f"{request_id}-{index}", "adapter": adapter, **prompt, "stop": stop,
                       "ignore_eos": body.ignore_eos, "deadline_ms": deadline_ms}
            for name, value in (("max_tokens", max_tokens), ("temperature", body.temperature),
                                ("top_p", body.top_p), ("top_k", body.top_k)):
                if value is not None:
                    request[name] = value
            if body.seed is not None:  # choices of one request differ, and each is reproducible
                request["seed"] = SEED_MIN + (body.seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1)
            try:
                validate_request(request, request["id"], vocab_size=_ANY_VOCAB)
            except RequestError as exc:
                raise ApiError(400, exc.message, code=exc.code) from None
            requests.append(request)
    return requests
