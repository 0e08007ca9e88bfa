"""A reply stream as Redis holds it, read whole with XRANGE (not `LorafleetClient.replies`, which
stops at the first terminal entry and skips a token index it has seen), and the contract's
exactly-once rules checked on it. Read it after the event that ends the request's story (its
terminal entry written and the consumers' offsets committed), so a late duplicate is in there."""

from __future__ import annotations

from lorafleet.common.contract import default_reply_stream
from lorafleet.common.messages import ReplyEntry, TokenReply, is_terminal, parse_entry


async def whole_stream(redis, request_id: str) -> list[ReplyEntry]:
    """Every entry of the request's default reply stream, in order."""
    return [parse_entry(fields) for _, fields in await redis.xrange(default_reply_stream(request_id))]


def assert_served_once(entries: list[ReplyEntry], what: str) -> list[int]:
    """Token entries whose indexes run 0, n0, n0+n1, ... (every token once, in order), then
    exactly one terminal entry, last. Returns the tokens."""
    tokens = [e for e in entries if isinstance(e, TokenReply)]
    expected = [sum(len(t.token_ids) for t in tokens[:i]) for i in range(len(tokens))]
    wrong = next((i for i, (t, want) in enumerate(zip(tokens, expected)) if t.index != want), None)
    assert wrong is None, (f"{what}: token entry {wrong} of {len(tokens)} has index {tokens[wrong].index}, expected "
                           f"{expected[wrong]} (a token twice or one lost); indexes from there: "
                           f"{[t.index for t in tokens[wrong:wrong + 8]]}")
    terminals = [i for i, e in enumerate(entries) if is_terminal(e)]
    assert terminals == [len(entries) - 1], f"{what}: terminal entries at {terminals} of {len(entries)}: " \
                                            f"{[entries[i] for i in terminals]}"
    return [t for e in tokens for t in e.token_ids]
