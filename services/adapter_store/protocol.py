"""The node-local protocol between engines and the adapter-store process: one JSON object per
line each way, over TCP; one request at a time per connection (clients pool connections).

    {"op": "get", "adapter": "tenant-a/sql-v3"}
        -> {"status": "ok", "path": "/dev/shm/lorafleet-adapters/...", "nbytes": 123}
         | {"status": "not_found" | "invalid" | "bad_request" | "error", "message": "..."}
    {"op": "prefetch", "adapter": "..."} -> {"status": "ok"} at once (fetch runs in the background)
    {"op": "health"} -> {"status": "ok", "health": {...}}

"error" is transient (storage unreachable after retries); the others are final for the request.
"""

from __future__ import annotations

from typing import Literal

import msgspec

MAX_LINE_BYTES = 64 * 1024

Op = Literal["get", "prefetch", "health"]
Status = Literal["ok", "not_found", "invalid", "bad_request", "error"]


class StoreRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    op: Op
    adapter: str | None = None


class HealthInfo(msgspec.Struct, frozen=True):
    adapters: int  # adapters cached (files in the shared folder)
    used_bytes: int
    budget_bytes: int
    loading: int  # fetches in flight
    fetches: int  # adapters fetched from storage since start


class StoreReply(msgspec.Struct, frozen=True, omit_defaults=True):
    status: Status
    path: str | None = None
    nbytes: int | None = None
    message: str | None = None
    health: HealthInfo | None = None


_request_decoder = msgspec.json.Decoder(StoreRequest)
_reply_decoder = msgspec.json.Decoder(StoreReply)
_encoder = msgspec.json.Encoder()


def encode(message: StoreRequest | StoreReply) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_request(line: bytes) -> StoreRequest:
    """Raises msgspec.ValidationError / DecodeError with a message naming the field at fault."""
    return _request_decoder.decode(line)


def decode_reply(line: bytes) -> StoreReply:
    return _reply_decoder.decode(line)
