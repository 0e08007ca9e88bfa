"""`lorafleet send`, `tail` and `cancel`: the public contract from a shell, with no kcat or jq.

    lorafleet send --ready-file /tmp/lorafleet.json --adapter demo/pirate --prompt "Hi" --max-tokens 40
    lorafleet tail --ready-file /tmp/lorafleet.json ID      # every entry as a JSON line, until the terminal one
    lorafleet cancel --ready-file /tmp/lorafleet.json ID    # the request ends with error `cancelled`

Addresses come from the ready file `lorafleet up --ready-file` writes (waited for, so a command
started right after `lorafleet up &` does not race it), else from the flags and LORAFLEET_*
variables. Both are thin shells over LorafleetClient: nothing here that a Kafka producer and a
Redis XREAD could not do by hand (docs/contract.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import msgspec

from lorafleet.common import settings

ENTRY_TYPES = {"TokenReply": "token", "DoneReply": "done", "ErrorReply": "error"}


def _add_connection_flags(p: argparse.ArgumentParser, *, kafka: bool) -> None:
    settings.add_flag(p, "--ready-file", "READY_FILE", str,
                      "read the addresses from this ready file of `lorafleet up` (waits for it to appear)")
    settings.add_flag(p, "--wait-ready-s", "WAIT_READY_S", float, "seconds to wait for the ready file")
    if kafka:
        settings.add_flag(p, "--kafka-bootstrap", "KAFKA_BOOTSTRAP", str, "Kafka bootstrap servers (without a ready file)")
        settings.add_flag(p, "--requests-topic", "REQUESTS_TOPIC", str, "topic to produce to (without a ready file)")
    settings.add_flag(p, "--redis-url", "REDIS_URL", str, "Redis URL of the reply streams (without a ready file)")


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    _add_connection_flags(p, kafka=True)
    p.add_argument("--json", default=None,
                   help="send this request object verbatim ('-': one JSON object per line from stdin) "
                        "instead of building one from the flags below [no env: a request, not a setting]")
    p.add_argument("--id", default=None, help="request id (default: a new random id) [no env: per request]")
    p.add_argument("--adapter", default=None, help="adapter id; absent: the base model [no env: per request]")
    p.add_argument("--prompt", default=None, help="prompt text [no env: per request]")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most [no env: per request]")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy [no env: per request]")
    p.add_argument("--follow", action="store_true", help="then stream the reply like `lorafleet tail` [no env]")
    settings.add_flag(p, "--timeout-s", "TAIL_TIMEOUT_S", float, "with --follow: seconds to wait for the terminal entry")


def add_tail_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="request id (its reply stream is lorafleet:out:ID)")
    _add_connection_flags(p, kafka=False)
    p.add_argument("--stream", default=None, help="read this stream key instead (a request's reply_stream) [no env]")
    p.add_argument("--text", action="store_true", help="print the text as it arrives, then the terminal entry [no env]")
    settings.add_flag(p, "--timeout-s", "TAIL_TIMEOUT_S", float, "seconds to wait for the terminal entry")


def add_cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="request id to cancel (sets lorafleet:cancel:ID; docs/contract.md)")
    _add_connection_flags(p, kafka=False)


def _addresses(args: argparse.Namespace) -> dict:
    """kafka_bootstrap, redis_url, requests_topic: from the ready file when one is named."""
    found = {"kafka_bootstrap": getattr(args, "kafka_bootstrap", None), "redis_url": args.redis_url,
             "requests_topic": getattr(args, "requests_topic", None)}
    if not args.ready_file:
        return found
    path, deadline = Path(args.ready_file), time.monotonic() + args.wait_ready_s
    while not path.exists():  # `lorafleet up` writes it atomically (rename) once every service is ready
        if time.monotonic() > deadline:
            raise ValueError(f"--ready-file {path}: not written within {args.wait_ready_s:.0f}s (is `lorafleet up` running?)")
        time.sleep(0.2)
    ready = json.loads(path.read_text())
    return {key: ready.get(key) or value for key, value in found.items()}


def _requests(args: argparse.Namespace) -> list[dict]:
    if args.json is not None:
        lines = sys.stdin.read().splitlines() if args.json == "-" else [args.json]
        out = []
        for n, line in enumerate(ln for ln in lines if ln.strip()):
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("id"), str):
                raise ValueError(f"--json request {n}: must be a JSON object with a string id")
            out.append(req)
        return out
    if args.prompt is None:
        raise ValueError("--prompt is required (or give the whole request with --json)")
    req = {"id": args.id or f"req-{uuid.uuid4().hex[:12]}", "prompt": args.prompt}
    for key in ("adapter", "max_tokens", "temperature"):
        if getattr(args, key) is not None:
            req[key] = getattr(args, key)
    return [req]


async def _send(args: argparse.Namespace) -> int:
    from lorafleet.client import LorafleetClient

    requests = _requests(args)
    where = _addresses(args)
    async with LorafleetClient(where["kafka_bootstrap"], where["redis_url"], requests_topic=where["requests_topic"]) as client:
        streams = [await client.submit(req) for req in requests]  # each waits for the broker's ack
        for req in requests:
            print(req["id"], flush=True)
        if args.follow:
            codes = [await _print_replies(client, stream, args) for stream in streams]
            return max(codes)
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from lorafleet.client import LorafleetClient
    from lorafleet.common.contract import default_reply_stream

    where = _addresses(args)
    client = LorafleetClient(None, where["redis_url"])  # reads Redis only
    try:
        return await _print_replies(client, args.stream or default_reply_stream(args.id), args)
    finally:
        await client.close()


async def _print_replies(client, stream: str, args: argparse.Namespace) -> int:
    """Print every entry of one reply stream up to its terminal entry; 0 for done, 1 for error."""
    from lorafleet.common.messages import ErrorReply, TokenReply

    last = None
    async for entry in client.replies(stream=stream, timeout=args.timeout_s):
        last = entry
        if getattr(args, "text", False) and isinstance(entry, TokenReply):
            print(entry.text, end="", flush=True)
            continue
        if getattr(args, "text", False):
            print()
        record = {"type": ENTRY_TYPES[type(entry).__name__], **msgspec.to_builtins(entry)}
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 1 if isinstance(last, ErrorReply) else 0


def run_send(args: argparse.Namespace) -> int:
    return asyncio.run(_send(args))


def run_cancel(args: argparse.Namespace) -> int:
    from lorafleet.client import LorafleetClient

    async def cancel() -> None:
        where = _addresses(args)
        client = LorafleetClient(None, where["redis_url"])
        try:
            await client.cancel(args.id)
        finally:
            await client.close()

    asyncio.run(cancel())
    return 0


def run_tail(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_tail(args))
    except TimeoutError as exc:
        print(f"lorafleet tail: {exc}", file=sys.stderr)
        return 3
