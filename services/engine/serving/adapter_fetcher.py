"""The engine service's adapters in hand: one fetch per adapter id at a time from the node's
adapter store, retried while the store is unavailable, kept in an in-process LRU by bytes.

The node's store holds the rest in shared memory, so a miss here costs a local file read, not a
download. Owned by EngineService (its event loop only).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.adapter_store.errors import AdapterStoreUnavailable
from lorafleet.common.retry import Backoff
from lorafleet.formats.lora_weights import LoraWeights


class AdapterFetcher:
    def __init__(self, store: AdapterStoreClient, budget_bytes: int, unavailable_s: float, log):
        """unavailable_s: give up on an adapter the store cannot serve after this long."""
        self.store, self.budget_bytes, self.unavailable_s, self.log = store, budget_bytes, unavailable_s, log
        self._fetches: dict[str, asyncio.Task] = {}
        self._adapters: OrderedDict[str, LoraWeights] = OrderedDict()  # validated, LRU
        self._bytes = 0

    def fetch(self, adapter_id: str) -> asyncio.Task:
        """The task resolving adapter_id (single flight: started once, shared by every request
        seen meanwhile; a failed or cancelled one is started again)."""
        task = self._fetches.get(adapter_id)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._fetch_with_patience(adapter_id))
            self._fetches[adapter_id] = task
        return task

    def settled(self, adapter_id: str, task: asyncio.Task) -> None:
        """The task is done: later requests hit the LRU (or start a new fetch after a failure)."""
        if self._fetches.get(adapter_id) is task:
            del self._fetches[adapter_id]

    async def _fetch_with_patience(self, adapter_id: str) -> LoraWeights:
        if adapter_id in self._adapters:
            self._adapters.move_to_end(adapter_id)
            return self._adapters[adapter_id]
        backoff = Backoff(self.unavailable_s, base_s=0.2, max_s=5.0)
        while True:
            try:
                weights = await self.store.get(adapter_id)
                break
            except AdapterStoreUnavailable as exc:
                self.log.warning("adapter store unavailable, retrying", adapter_id=adapter_id, error=str(exc))
                if not await backoff.sleep():
                    raise
        self._adapters[adapter_id] = weights
        self._bytes += weights.nbytes
        while self._bytes > self.budget_bytes and len(self._adapters) > 1:
            _, dropped = self._adapters.popitem(last=False)
            self._bytes -= dropped.nbytes
        return weights
