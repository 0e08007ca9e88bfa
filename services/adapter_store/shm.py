"""The node store's cache: each validated adapter written ONCE as a canonical file in a host-memory
folder shared with the engines of the node (tmpfs: /dev/shm, or a Kubernetes emptyDir with
medium Memory), so engines never download or validate an adapter again.

Files appear atomically (write a hidden temp file, then rename) and are deleted when the LRU
byte budget evicts them; a file is never rewritten in place. Engines map the file (safetensors
maps it: formats.lora_weights.load_canonical): their weights ARE these pages, not a copy. POSIX keeps an
unlinked file's data until its last mapping goes, so deleting is safe; an engine that got a path
and was too slow finds the file gone and simply asks again (AdapterStoreClient does).

The budget counts file bytes: on tmpfs the files ARE the host memory the adapters take, plus
those an engine still maps after their eviction (each engine's AdapterFetcher LRU bounds them:
LORAFLEET_ENGINE_HOST_ADAPTER_BYTES).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from pathlib import Path
from typing import Callable

import structlog

from lorafleet.common.ids import validate_adapter_id
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import ModelSpec

from .cache import LoadingLRU
from .errors import AdapterStoreUnavailable
from .source import AdapterSource
from .spill import DiskSpill
from .store import fetch_validated

FILE_SUFFIX = ".lora.safetensors"
TEMP_SUFFIX = FILE_SUFFIX + ".tmp"


def file_name(adapter_id: str, generation: int) -> str:
    """Flat, unique, readable: '/' (never inside a segment) becomes '~'; a digest keeps long ids distinct.

    The generation makes every admission a new file, so a re-fetched adapter never overwrites a
    file that a slow engine is still opening under the previous name.
    """
    digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:12]
    return f"{adapter_id.replace('/', '~')[:100]}-{digest}.{generation}{FILE_SUFFIX}"


def write_canonical_atomically(weights: LoraWeights, path: Path) -> int:
    """Write `weights` to `path` via a temp file + rename; returns the file's size in bytes."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        weights.save_canonical(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


class SharedMemoryStore:
    """`await get_path(id)` -> path of the adapter's canonical file in `shm_dir`."""

    def __init__(
        self,
        source: AdapterSource,
        spec: ModelSpec,
        shm_dir: Path,
        *,
        memory_bytes: int,
        negative_ttl_s: float,
        max_rank: int = 256,
        clock: Callable[[], float] = time.monotonic,
        spill: DiskSpill | None = None,
    ) -> None:
        self.source = source
        self.spec = spec
        self.max_rank = max_rank
        self.spill = spill  # where memory evictions go instead of being forgotten (None: off)
        self.shm_dir = Path(shm_dir)
        self.shm_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_files()
        self._generation = itertools.count()
        self.cache: LoadingLRU[Path] = LoadingLRU(
            self._load, budget_bytes=memory_bytes, negative_ttl_s=negative_ttl_s, on_evict=self._delete, clock=clock
        )

    async def get_path(self, adapter_id: str) -> Path:
        validate_adapter_id(adapter_id)
        return await self.cache.get(adapter_id)

    def prefetch(self, adapter_id: str) -> None:
        validate_adapter_id(adapter_id)
        self.cache.prefetch(adapter_id)

    async def aclose(self) -> None:
        """Stop loads and delete every file this store wrote (the folder outlives the process)."""
        spill, self.spill = self.spill, None  # evictions at shutdown are not worth spilling
        await self.cache.aclose()
        if spill is not None:
            spill.clear()

    async def _load(self, adapter_id: str) -> tuple[Path, int]:
        path = self.shm_dir / file_name(adapter_id, next(self._generation))
        if self.spill is not None and adapter_id in self.spill:
            nbytes = await asyncio.to_thread(self.spill.restore, adapter_id, path)
            if nbytes is not None:  # validated when first fetched; engines re-check shapes on load
                structlog.get_logger().bind(adapter_id=adapter_id).info("adapter restored from disk", path=str(path))
                return path, nbytes
        weights = await fetch_validated(self.source, adapter_id, self.spec, self.max_rank)
        try:
            nbytes = await asyncio.to_thread(write_canonical_atomically, weights, path)
        except OSError as exc:  # e.g. ENOSPC: the tmpfs is smaller than the budget; not the adapter's fault
            raise AdapterStoreUnavailable(f"cannot write adapter {adapter_id!r} to {self.shm_dir}: {exc}") from exc
        structlog.get_logger().bind(adapter_id=adapter_id).info("adapter file written", path=str(path), nbytes=nbytes)
        return path, nbytes

    def _delete(self, adapter_id: str, path: Path) -> None:
        if self.spill is not None and path.exists():
            try:
                self.spill.keep(adapter_id, path, path.name)
            except OSError as exc:  # a full or failing disk only costs a later re-download
                structlog.get_logger().bind(adapter_id=adapter_id).warning("adapter spill failed", error=str(exc))
        path.unlink(missing_ok=True)

    def _remove_stale_files(self) -> None:
        """Files left by a previous run of the store are not in the new LRU: they would leak memory."""
        stale = [p for p in self.shm_dir.iterdir() if p.name.endswith((FILE_SUFFIX, ".tmp")) and p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            structlog.get_logger().info("stale adapter files removed", count=len(stale), shm_dir=str(self.shm_dir))
