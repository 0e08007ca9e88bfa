"""Reply entries -> OpenAI answers: whole (`stream: false`) or as server-sent-event chunks.

One `Choice` per contract request collects its reply entries; an `AnswerFormat` (completions or
chat completions) writes the objects OpenAI's clients parse. Usage counts each prompt once (as
OpenAI does for n > 1) and every choice's generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from lorafleet.common.messages import DoneReply, ErrorReply, ReplyEntry, TokenReply


@dataclass
class Choice:
    index: int
    prompt_index: int  # which prompt of the request (usage counts each prompt once)
    texts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: ErrorReply | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def add(self, entry: ReplyEntry) -> None:
        if isinstance(entry, TokenReply):
            self.texts.append(entry.text)
            self.completion_tokens += len(entry.token_ids)
        elif isinstance(entry, DoneReply):
            self.finish_reason = entry.finish_reason
            self.prompt_tokens, self.completion_tokens = entry.prompt_tokens, entry.completion_tokens
        else:
            self.error = entry


def usage(choices: list[Choice]) -> dict:
    prompt_tokens = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else msgspec.json.encode(payload).decode()
    return f"data: {data}\n\n".encode()


class AnswerFormat:
    """The objects of one endpoint: `text_completion` or `chat.completion` (and their chunks)."""

    def __init__(self, chat: bool, answer_id: str, created: int, model: str) -> None:
        self.chat, self.id, self.created, self.model = chat, answer_id, created, model

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def answer(self, choices: list[Choice]) -> dict:
        items = []
        for c in choices:
            text = "".join(c.texts)
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            items.append({"index": c.index, **body, "logprobs": None, "finish_reason": c.finish_reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj, items), "usage": usage(choices)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, *,
              role: bool = False, usage_counts: dict | None = None) -> dict:
        """A delta of one choice: `text` (None: no content), the role on a chat stream's first
        chunk, `finish_reason` on its last; usage on the stream's last finishing chunk."""
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            item = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [item])
        if usage_counts is not None:
            chunk["usage"] = usage_counts
        return chunk

    def usage_chunk(self, choices: list[Choice]) -> dict:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": usage(choices)}
