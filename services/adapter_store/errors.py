"""The three outcomes of asking for an adapter that are not a success.

Fatal, cached briefly (negative TTL), never retried:
  - AdapterNotFoundError: no adapter folder under the root (contract error ``adapter_not_found``).
  - InvalidAdapterError: found but fails validation (contract error ``invalid_adapter``); the same
    class the engine's PEFT validator raises, so callers catch one type.
Transient, never cached, retried with backoff before it is raised:
  - AdapterStoreUnavailable: storage or the node's store process cannot answer right now.
"""

from __future__ import annotations

from lorafleet.formats.peft_config import InvalidAdapterError

__all__ = ["AdapterNotFoundError", "AdapterStoreUnavailable", "InvalidAdapterError"]


class AdapterNotFoundError(LookupError):
    """No adapter with this id exists under the adapter root."""


class AdapterStoreUnavailable(RuntimeError):
    """Storage (or the store process) failed transiently; asking again later may succeed."""
