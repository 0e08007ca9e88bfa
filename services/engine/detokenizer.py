"""Incremental detokenization with stop strings: emit only complete UTF-8 and never a stop string."""

from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded as context so a first token's leading space is right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[_prefix:_read] is the context already turned into text
        self._read = len(self._ids)
        self.text = ""  # all complete text so far (stop string and beyond cut off)
        self._emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> tuple[list[int], list[int]] | None:
        """Append a generated token; return the id windows (context, context + new) whose decoded
        difference is the new text, or None once stopped. Decode them (batched across requests:
        `decode_batch`) and hand the two strings to `accept`."""
        if self.stopped:
            return None
        self._ids.append(token_id)
        return self._ids[self._prefix : self._read], self._ids[self._prefix :]

    def accept(self, before: str, after: str) -> None:
        """Take the decoded windows of `push`; sets `stopped` when a stop string appears."""
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return  # an incomplete multi-byte character: wait for the next token
        start = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._check_stop(start)

    def add(self, token_id: int) -> None:
        """push + decode + accept for one token (the engine batches these across requests)."""
        windows = self.push(token_id)
        if windows is not None:
            self.accept(self._decode(windows[0]), self._decode(windows[1]))

    def _flush(self) -> None:
        """At the end: a trailing incomplete character will never complete; show it as decoded."""
        if self.stopped or self._read == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        start = len(self.text)
        self.text += after[len(before) :]
        self._prefix = self._read = len(self._ids)
        self._check_stop(start)

    def _check_stop(self, new_from: int) -> None:
        longest = max((len(s) for s in self.stop), default=0)
        window_start = max(0, new_from - longest + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Chars at the end of text that could still become a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def take_delta(self, final: bool) -> str:
        """New text safe to show; at the end (final) everything left, stop strings excluded."""
        if final:
            self._flush()
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def decode_batch(tokenizer, windows: list[list[int]]) -> list[str]:
    """Decode many id lists in one tokenizer call (the Rust tokenizer works through them at once)."""
    if not windows:
        return []
    return tokenizer.batch_decode(windows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
