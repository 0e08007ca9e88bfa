"""Reading an adapter's two files from the adapter root (local folder or S3) through obstore.

Sizes are checked from the folder listing BEFORE any object is read, and again from the GET's
metadata before its body is read (the object may have been replaced in between). Pickle files
are never read. Transient storage failures are retried here with backoff; what survives the
retries leaves as AdapterStoreUnavailable, never as "not found".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import obstore
import structlog
from obstore.exceptions import GenericError, NotFoundError, PermissionDeniedError, UnauthenticatedError

from lorafleet.common.adapter_root import CONFIG_FILE, WEIGHTS_FILE, S3Options, open_root

from .errors import AdapterNotFoundError, AdapterStoreUnavailable, InvalidAdapterError
from .retry import RetryPolicy, with_retries

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KiB; 1 MiB is generous


@dataclass(frozen=True)
class FetchedAdapter:
    config_bytes: bytes
    weights_bytes: bytes


@dataclass
class SourceStats:
    """Counters of what this source asked storage for (tests and health read them)."""

    fetches: int = 0  # adapters fetched (one per AdapterSource.fetch call)
    lists: int = 0  # folder listings sent, retries included
    gets: int = 0  # object GETs sent, retries included
    bytes_read: int = 0


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (NotFoundError, FileNotFoundError, PermissionDeniedError, UnauthenticatedError, PermissionError)):
        return False
    # GenericError: network failures, 5xx, throttling, timeouts. OSError: local disk hiccups.
    return isinstance(exc, (GenericError, OSError, TimeoutError))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class AdapterSource:
    """Fetches `<root>/<adapter id>/{adapter_config.json, adapter_model.safetensors}`; ids must be valid."""

    def __init__(
        self,
        root: str,
        *,
        max_adapter_bytes: int,
        s3: S3Options = S3Options(),
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.root = root
        self.max_adapter_bytes = max_adapter_bytes
        self.retry = retry
        self.stats = SourceStats()
        self._store = open_root(root, s3)

    async def fetch(self, adapter_id: str) -> FetchedAdapter:
        log = structlog.get_logger().bind(adapter_id=adapter_id)
        self.stats.fetches += 1
        sizes = await self._storage_call(lambda: self._list(adapter_id), log, adapter_id, "listing")
        where = f"{self.root.rstrip('/')}/{adapter_id}"
        if not sizes:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found: no files under {where}/")
        pickles = sorted(name for name in sizes if name.endswith(PICKLE_SUFFIXES))
        hint = f" (found {pickles}: pickle files are never loaded; save with safe_serialization=True)" if pickles else ""
        if CONFIG_FILE not in sizes and WEIGHTS_FILE in sizes:
            # `lorafleet adapters push` writes the config last: weights alone are an upload under
            # way (or abandoned), not an adapter yet, and must not be remembered as invalid.
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found: {where}/ has {WEIGHTS_FILE} but no "
                                       f"{CONFIG_FILE} (yet: an upload in progress?)")
        if CONFIG_FILE not in sizes:
            raise InvalidAdapterError(f"{CONFIG_FILE} is missing in {where}{hint}")
        if WEIGHTS_FILE not in sizes:
            raise InvalidAdapterError(f"{WEIGHTS_FILE} is missing in {where}{hint}")
        self._check_size(CONFIG_FILE, sizes[CONFIG_FILE], MAX_CONFIG_BYTES, "the config size limit")
        self._check_size(WEIGHTS_FILE, sizes[WEIGHTS_FILE], self.max_adapter_bytes, "LORAFLEET_STORE_MAX_ADAPTER_BYTES")
        config_bytes, weights_bytes = await asyncio.gather(
            self._storage_call(lambda: self._get(f"{adapter_id}/{CONFIG_FILE}", MAX_CONFIG_BYTES), log, adapter_id, CONFIG_FILE),
            self._storage_call(
                lambda: self._get(f"{adapter_id}/{WEIGHTS_FILE}", self.max_adapter_bytes), log, adapter_id, WEIGHTS_FILE
            ),
        )
        return FetchedAdapter(config_bytes, weights_bytes)

    async def _storage_call(self, operation, log, adapter_id: str, what: str):
        """Retry transient failures; map what is left to not-found / unavailable."""
        try:
            return await with_retries(operation, self.retry, _is_transient, log, f"{adapter_id}: {what}")
        except (NotFoundError, FileNotFoundError):
            # Listed a moment ago, gone now: deleted concurrently. Same answer as never there.
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found: its {what} vanished while reading") from None
        except (GenericError, OSError, TimeoutError, PermissionDeniedError, UnauthenticatedError) as exc:
            raise AdapterStoreUnavailable(f"storage error on {what} of {adapter_id!r} under {self.root}: {_first_line(exc)}") from exc

    async def _list(self, adapter_id: str) -> dict[str, int]:
        """File name -> size of the objects directly in the adapter's folder."""
        self.stats.lists += 1
        listing = await obstore.list_with_delimiter_async(self._store, prefix=f"{adapter_id}/")
        return {obj["path"].rsplit("/", 1)[-1]: int(obj["size"]) for obj in listing["objects"]}

    async def _get(self, path: str, limit: int) -> bytes:
        self.stats.gets += 1
        result = await obstore.get_async(self._store, path)
        size = int(result.meta["size"])
        if size > limit:  # replaced by a bigger object since the listing: still never read it
            raise InvalidAdapterError(f"{path} is {size} bytes, over the limit of {limit} bytes")
        data = bytes(await result.bytes_async())
        self.stats.bytes_read += len(data)
        return data

    @staticmethod
    def _check_size(name: str, size: int, limit: int, limit_name: str) -> None:
        if size > limit:
            raise InvalidAdapterError(f"{name} is {size} bytes, over {limit_name} ({limit} bytes); it was not read")
