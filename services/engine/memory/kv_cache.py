"""KV pages of requests: each request owns a list of pages, one per block of `block_size` tokens.

The KV manager owns every request's block list; the scheduler asks it whether a request can grow
and the batch builder reads block tables from it. When free pages run short it first evicts
cached adapters that no running request uses (AdapterCache.evict_for), never pinned ones.
"""

from __future__ import annotations

from .adapter_cache import AdapterCache
from .allocator import PageAllocator


class KVCacheManager:
    def __init__(self, allocator: PageAllocator, adapters: AdapterCache, block_size: int):
        self.allocator = allocator
        self.adapters = adapters
        self.block_size = block_size
        self._blocks: dict[str, list[int]] = {}

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def pages_needed(self, request_id: str, total_tokens: int) -> int:
        """Pages to add so the request can hold `total_tokens` tokens of KV."""
        return max(0, self.blocks_for_tokens(total_tokens) - len(self._blocks.get(request_id, ())))

    def can_grow(self, request_id: str, total_tokens: int, keep_adapter: str | None = None) -> bool:
        need = self.pages_needed(request_id, total_tokens)
        return need <= self.allocator.num_free + self.adapters.evictable_pages(exclude=keep_adapter)

    def grow(self, request_id: str, total_tokens: int) -> None:
        """Give the request pages for `total_tokens` tokens; the caller checked can_grow."""
        need = self.pages_needed(request_id, total_tokens)
        if need == 0:
            return
        if need > self.allocator.num_free:
            self.adapters.evict_for(need - self.allocator.num_free)
        self._blocks.setdefault(request_id, []).extend(self.allocator.allocate(need, ("kv", request_id)))

    def release(self, request_id: str) -> None:
        pages = self._blocks.pop(request_id, None)
        if pages:
            self.allocator.free(pages, ("kv", request_id))

    @property
    def num_requests(self) -> int:
        return len(self._blocks)

    def used_pages(self) -> int:
        return sum(len(b) for b in self._blocks.values())
