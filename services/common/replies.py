"""The one writer of reply streams: a whole engine step's entries in one Redis round trip,
exactly once per request even when the request is served twice.

Per request the writer keeps a hash ``lorafleet:state:<id>`` = {tokens: published token count,
terminal: 1 once a done/error entry is written}. A Lua script (one EVALSHA for all of a step's
requests) reads each request's state and appends an entry only when it is new:

    token entry, index + n <= tokens   -> already written by an earlier delivery: skipped
    token entry, index == tokens       -> appended; tokens += n
    token entry, any other index       -> a gap or partial overlap: skipped, counted as conflict
    terminal entry                     -> appended once (not after a gap in the same call: the
                                          stream must not end with tokens missing); everything
                                          after it is skipped

so redelivered requests, retried pipelines and two engines racing on one request all leave the
stream exactly as one clean run would. A request whose cancel key (``lorafleet:cancel:<id>``)
exists gets a terminal ``error`` entry, code ``cancelled``, at its next publish instead of what
was sent, and the result says so (the engine then aborts it). Every write sets EXPIRE ttl on the stream and the state,
so both disappear ttl seconds after the last entry (the terminal one, normally).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from lorafleet.common import settings
from lorafleet.common.contract import RESERVED_KEY_PREFIX, cancel_key
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import ReplyEntry, TokenReply, entry_fields, token_fields
from lorafleet.common.retry import OUTAGE_MAX_S, Backoff

# One call writes a whole publish (up to PUBLISH_CHUNK requests): KEYS are 3 per request (stream,
# state, cancel), in order; ARGV: maxlen, ttl, then one JSON array with, per request, its entries
# as [index (-1 for a terminal entry), token count, [field, value, ...]]. One argument decoded by
# cjson instead of ~12 per entry: packing and parsing a step's 256 separate calls was most of the
# engine service's event-loop time (bench/results/service-overhead/NOTES.md).
# Returns per request {tokens published, terminal written 0/1, appended, conflicts, cancelled 0/1,
# error ("" or what Redis refused: e.g. WRONGTYPE when the stream key holds another type)}.
_PUBLISH_LUA = """
local maxlen, ttl = ARGV[1], ARGV[2]
local requests = cjson.decode(ARGV[3])
local results = {}
for r = 1, #requests do
  local stream, state, cancel = KEYS[3 * r - 2], KEYS[3 * r - 1], KEYS[3 * r]
  local published = tonumber(redis.call('HGET', state, 'tokens') or '0')
  local terminal = redis.call('HEXISTS', state, 'terminal') == 1
  local appended, conflicts, gap, cancelled, err = 0, 0, false, 0, ''
  local entries = requests[r]
  if not terminal and redis.call('EXISTS', cancel) == 1 then
    entries = {{-1, 0, {'type', 'error', 'code', 'cancelled',
                        'message', 'the request was cancelled (its key lorafleet:cancel:<id> was set).'}}}
    cancelled = 1
  end
  for e = 1, #entries do
    local index, ntokens, fields = entries[e][1], entries[e][2], entries[e][3]
    local write = false
    if terminal then
      write = false
    elseif index < 0 then
      if gap then conflicts = conflicts + 1 else write = true end
    elseif index == published then
      write = true
    elseif index + ntokens > published then
      conflicts = conflicts + 1
      if index > published then gap = true end
    end
    if write then
      local ok = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
      if type(ok) == 'table' and ok.err then err = ok.err break end
      appended = appended + 1
      if index < 0 then terminal = true else published = published + ntokens end
    end
  end
  if appended > 0 then
    redis.call('HSET', state, 'tokens', published)
    if terminal then redis.call('HSET', state, 'terminal', 1) end
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', state, ttl)
  end
  results[r] = {published, terminal and 1 or 0, appended, conflicts, cancelled, err}
end
return results
"""
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()
_json = msgspec.json.Encoder()


def connect_redis(url: str) -> aioredis.Redis:
    """A client whose every call is bounded in time (LORAFLEET_REDIS_TIMEOUT_S): a Redis that stops
    answering raises TimeoutError, retried as transient, instead of hanging the caller."""
    timeout = settings.read("REDIS_TIMEOUT_S")
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def state_key(request_id: str) -> str:
    return RESERVED_KEY_PREFIX + request_id


def is_transient_redis_error(exc: BaseException) -> bool:
    # BusyLoadingError (a restarting server) is a ConnectionError subclass.
    return isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError))


class ReplyWriteError(Exception):
    """Redis stayed unreachable for the whole retry budget; nothing is known to be written."""


class RequestState(msgspec.Struct, frozen=True):
    """A request's reply stream after a publish: tokens published so far, whether its terminal
    entry is written, how many of this publish's entries were appended / refused as conflicts,
    and `error` when Redis refused the write (e.g. the reply_stream key holds another type)."""

    tokens: int
    terminal: bool
    appended: int = 0
    conflicts: int = 0
    error: str | None = None
    cancelled: bool = False  # this publish found the request cancelled and wrote its terminal entry


PUBLISH_CHUNK = 512  # requests per script call: Redis runs nothing else while a script runs


def _request_entries(entries: list[ReplyEntry]) -> list[list[Any]]:
    """One request's entries as the script reads them: [index or -1, token count, [field, value, ...]]."""
    out: list[list[Any]] = []
    for entry in entries:
        if isinstance(entry, TokenReply):
            if not entry.token_ids or entry.index < 0:
                raise ValueError(f"a token entry needs >= 1 token id and index >= 0, got {entry!r}")
            out.append([entry.index, len(entry.token_ids), token_fields(entry)])
        else:
            out.append([-1, 0, [x for pair in entry_fields(entry).items() for x in pair]])
    return out


class ReplyWriter:
    """Writes reply entries; the caller owns the Redis client (``redis.asyncio.Redis``)."""

    def __init__(self, redis: aioredis.Redis, *, maxlen: int | None = None, ttl_s: int | None = None,
                 retry_budget_s: float | None = None) -> None:
        self.redis = redis
        self.maxlen = maxlen if maxlen is not None else settings.read("STREAM_MAXLEN")
        self.ttl_s = ttl_s if ttl_s is not None else settings.read("STREAM_TTL_S")
        self.retry_budget_s = (retry_budget_s if retry_budget_s is not None
                               else settings.read("REDIS_RETRY_S"))
        self.round_trips = 0  # every request to Redis this writer made (pipelines, script loads)
        self._script_loaded = False
        self._log = get_logger("replies")

    async def prepare(self) -> None:
        """Load the Lua script (also done lazily by the first publish)."""
        await self._with_retries(self._load_script, "SCRIPT LOAD")

    async def _load_script(self) -> None:
        self.round_trips += 1
        sha = await self.redis.script_load(_PUBLISH_LUA)
        sha = sha.decode() if isinstance(sha, bytes) else sha
        if sha != _PUBLISH_SHA:  # would mean Redis hashes scripts differently: never retry-loop
            raise RuntimeError(f"Redis returned script sha {sha}, expected {_PUBLISH_SHA}")
        self._script_loaded = True

    async def _with_retries(self, operation: Any, what: str, budget_s: float | None = None) -> Any:
        budget_s = self.retry_budget_s if budget_s is None else budget_s
        backoff = Backoff(budget_s, max_s=OUTAGE_MAX_S if math.isinf(budget_s) else 2.0)
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not is_transient_redis_error(exc):
                    raise
                if not await backoff.sleep():
                    self._log.error("redis unreachable, giving up", what=what, error=repr(exc))
                    raise ReplyWriteError(f"{what}: Redis unreachable for {budget_s}s: {exc}") from exc
                self._log.warning("redis error, retrying", what=what, attempt=backoff.failures,
                                  error=repr(exc))

    async def publish(self, entries: Sequence[tuple[str, str, ReplyEntry]]) -> dict[str, RequestState]:
        """Write `(stream key, request id, entry)` triples, in order per request, in one pipelined
        round trip (plus one script load after a Redis restart). Returns each request's state.

        Safe to call again with the same entries after any failure: duplicates are skipped.
        Raises ReplyWriteError when Redis stays unreachable past the retry budget.
        """
        groups: dict[str, tuple[str, list[ReplyEntry]]] = {}
        for stream, request_id, entry in entries:
            known = groups.setdefault(request_id, (stream, []))
            if known[0] != stream:
                raise ValueError(f"request {request_id!r} published to two streams: {known[0]!r}, {stream!r}")
            known[1].append(entry)
        if not groups:
            return {}
        # Built (and checked) before anything is sent: a malformed entry writes nothing.
        ids = list(groups)
        calls = []
        for i in range(0, len(ids), PUBLISH_CHUNK):
            chunk = ids[i:i + PUBLISH_CHUNK]
            keys = [key for rid in chunk for key in (groups[rid][0], state_key(rid), cancel_key(rid))]
            payload = _json.encode([_request_entries(groups[rid][1]) for rid in chunk])
            calls.append((chunk, keys, payload))
        if not self._script_loaded:
            await self.prepare()
        states: dict[str, RequestState] = {}
        pending = calls
        while pending:
            results = await self._with_retries(lambda: self._run_pipeline(pending), "publish")
            reload = []
            for call, result in zip(pending, results):
                if isinstance(result, redis_errors.NoScriptError):
                    reload.append(call)  # Redis restarted and lost its script cache
                elif isinstance(result, Exception):  # the whole call refused (not one stream's type)
                    self._log.error("reply write refused", requests=len(call[0]), error=repr(result))
                    states.update({rid: RequestState(0, False, error=str(result)) for rid in call[0]})
                else:
                    states.update(self._states(call[0], result))
            if reload:
                await self._with_retries(self._load_script, "SCRIPT LOAD")
            pending = reload
        return states

    def _states(self, request_ids: list[str], results: list[Any]) -> dict[str, RequestState]:
        states = {}
        for request_id, (tokens, terminal, appended, conflicts, cancelled, error) in zip(request_ids, results):
            error = error.decode() if isinstance(error, bytes) else error
            if error:
                self._log.error("reply write refused", request_id=request_id, error=error)
            if conflicts:
                self._log.warning("token entries out of sequence were dropped", request_id=request_id,
                                  conflicts=conflicts, published=tokens)
            states[request_id] = RequestState(int(tokens), bool(terminal), int(appended), int(conflicts),
                                              error or None, bool(cancelled))
        return states

    async def _run_pipeline(self, calls: list[tuple[list[str], list[str], bytes]]) -> list[Any]:
        self.round_trips += 1
        pipe = self.redis.pipeline(transaction=False)
        for _ids, keys, payload in calls:
            pipe.evalsha(_PUBLISH_SHA, len(keys), *keys, self.maxlen, self.ttl_s, payload)
        return await pipe.execute(raise_on_error=False)

    async def published_count(self, request_id: str) -> tuple[int, bool]:
        """(tokens already published, terminal entry written) for a request, e.g. one an engine
        is about to serve again after a Kafka redelivery."""
        return (await self.published_counts([request_id]))[request_id]

    async def published_counts(self, request_ids: Sequence[str], *,
                               budget_s: float | None = None) -> dict[str, tuple[int, bool]]:
        """published_count for many requests in one pipelined round trip (a consumer's batch);
        budget_s: how long to retry through a Redis outage (default: the writer's budget)."""
        ids = list(dict.fromkeys(request_ids))

        async def read() -> list[Any]:
            self.round_trips += 1
            pipe = self.redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.hmget(state_key(request_id), ["tokens", "terminal"])
            return await pipe.execute()

        rows = await self._with_retries(read, "HMGET state", budget_s) if ids else []
        return {rid: ((int(tokens) if tokens is not None else 0), terminal is not None)
                for rid, (tokens, terminal) in zip(ids, rows)}
