"""Adapters resident in the unified pool: slots, pins and an LRU of cached, unused adapters.

The AdapterCache owns which adapters are on the device, their slots and the device tables the
LoRA ops read (AdapterTables). An adapter used by a scheduled request is pinned (pins > 0) and is
never evicted; an unpinned adapter stays cached in its pages until KV or another adapter needs
them (least recently used first).

Loading: each adapter is packed once into its host form (adapter_pack.py: the page buffer and
table rows; a TP driver packs its own form, see `_upload`), kept in a byte-budgeted host LRU, and copied into the pool by the
AdapterUploader (adapter_upload.py): on CUDA on a side stream, so neither the host nor the forward
passes wait for it. The main stream waits for a load's event when the adapter is pinned for a step
(`acquire`) and when it is evicted (its pages and slot go to someone else), never before.

NOTE: a slot is an index into the device tables, not an adapter id; slots are reused after
eviction, so ops must never keep a slot across steps.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES, ModelSpec

from ..config import EngineConfig
from ..ops.base import AdapterTables
from .adapter_pack import HostAdapterCache
from .adapter_upload import AdapterUploader
from .allocator import PageAllocator
from .host_budget import PackBudget
from .layout import AdapterLayout, adapter_layout


@dataclass
class _Resident:
    adapter_id: str
    slot: int
    pages: list[int]
    pins: int
    # CUDA: the event of the side-stream load, until the main stream was made to wait for it once
    # (every later main-stream step is ordered after that wait). None: nothing to wait for.
    ready: torch.cuda.Event | None = None


def max_adapter_pages(spec: ModelSpec, max_rank: int, page_elems: int) -> int:
    """Pages of the widest adapter accepted (every module at max_rank): the page tables' width."""
    return AdapterLayout.build(spec, {m: max_rank for m in LORA_MODULES}).num_pages(page_elems)


class AdapterCache:
    def __init__(self, pool: torch.Tensor, allocator: PageAllocator, spec: ModelSpec, max_slots: int, max_rank: int,
                 packed_bytes: int = EngineConfig.packed_adapter_bytes, prefetch_reserve_pages: int | None = None,
                 pack_threads: int = 4, packer=None, pack_budget: PackBudget | None = None):
        """packer: the packed host form (adapter_pack.PagePacker by default); a subclass that
        packs another form overrides `_upload` too (TpAdapterCache). packed_bytes 0: the host
        budget of packs follows the work (`fit_host_budget`) within `pack_budget` (default: sized
        from the host memory available now, host_budget.PackBudget.from_host)."""
        self.pool = pool  # [L, num_pages, P]
        self.allocator = allocator
        # Prefetches leave this many pages free for KV growth. Without it, a pool full of KV
        # evicts each prefetched adapter a step later and the lookahead loads it again, so loads
        # run many times over the adapters a trace touches (bench/results/h200/NOTES.md).
        self.prefetch_reserve_pages = pool.shape[1] // 16 if prefetch_reserve_pages is None else prefetch_reserve_pages
        self.spec = spec
        page_elems = pool.shape[2]
        self.max_pages_per_adapter = max_adapter_pages(spec, max_rank, page_elems)
        self.tables = AdapterTables.zeros(max_slots, self.max_pages_per_adapter, spec.num_layers,
                                          tuple(spec.module_shape(m) for m in LORA_MODULES), pool.device)
        self._resident: dict[str, _Resident] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # unpinned residents, oldest first
        self._evictable_pages = 0  # pages held by unpinned residents (kept in step with _lru)
        self._free_slots = list(range(max_slots - 1, -1, -1))
        # resident adapter -> (its largest rank, the modules it targets): read by every build_batch
        self._targets: dict[str, tuple[int, frozenset[str]]] = {}
        self.num_loads = 0  # adapters copied into the pool (counters for tests and metrics)
        self.num_evictions = 0
        on_cuda = pool.device.type == "cuda"
        # Packs are pageable (the uploader pins its ring and rows once, never per load): adapter_upload.py.
        if packed_bytes == 0 and pack_budget is None:
            pack_budget = PackBudget.from_host()
        self.pack_budget = pack_budget if packed_bytes == 0 else None
        self.host = HostAdapterCache(spec, page_elems, pool.dtype,
                                     budget_bytes=packed_bytes if self.pack_budget is None else pack_budget.floor,
                                     background=on_cuda, workers=pack_threads, packer=packer,
                                     max_budget_bytes=None if self.pack_budget is None else pack_budget.ceiling)
        self.uploader = self._new_uploader()
        self.upload_s = 0.0  # the caller's time in `_upload` (copies issued or made; benchmarks)
        # Prefetches whose pack was still running (CUDA): loaded by `poll` once packed, so that
        # add_request never waits for a pack.
        self._deferred: OrderedDict[str, LoraWeights] = OrderedDict()

    # --- queries -------------------------------------------------------------------------
    def slot_of(self, adapter_id: str) -> int | None:
        res = self._resident.get(adapter_id)
        return None if res is None else res.slot

    def max_rank_of(self, adapter_id: str) -> int:
        return self._targets[adapter_id][0]

    def modules_of(self, adapter_id: str) -> frozenset[str]:
        """The modules a resident adapter targets (in any layer)."""
        return self._targets[adapter_id][1]

    def is_resident(self, adapter_id: str) -> bool:
        return adapter_id in self._resident

    def pages_to_load(self, weights: LoraWeights) -> int:
        return adapter_layout(weights, self.spec).num_pages(self.pool.shape[2])

    def evictable_pages(self, exclude: str | None = None) -> int:
        n = self._evictable_pages
        if exclude is not None and exclude in self._lru:
            n -= len(self._resident[exclude].pages)
        return n

    @property
    def num_resident(self) -> int:
        """Adapters in the pool (pinned or cached)."""
        return len(self._resident)

    def resident_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values())

    def cached_ids(self) -> list[str]:
        """Unpinned residents, least recently used first."""
        return list(self._lru)

    def pins(self, adapter_id: str) -> int:
        res = self._resident.get(adapter_id)
        return 0 if res is None else res.pins

    def can_acquire(self, adapter_id: str, weights: LoraWeights, extra_pages: int = 0) -> bool:
        """Could `acquire` succeed while also leaving `extra_pages` for KV?"""
        if adapter_id in self._resident:
            return extra_pages <= self.allocator.num_free + self.evictable_pages(exclude=adapter_id)
        if not self._free_slots and not self._lru:
            return False
        need = self.pages_to_load(weights) + extra_pages
        return need <= self.allocator.num_free + self._evictable_pages

    # --- pin / unpin ---------------------------------------------------------------------
    def acquire(self, adapter_id: str, weights: LoraWeights) -> int:
        """Pin the adapter (loading it into the pool if needed) and return its slot."""
        res = self._resident.get(adapter_id)
        if res is None:
            res = self._load(adapter_id, weights)
        elif res.pins == 0:
            del self._lru[adapter_id]
            self._evictable_pages -= len(res.pages)
        res.pins += 1
        self._ready(res)  # the step's forward (queued after this) reads the adapter
        return res.slot

    def prefetch(self, adapter_id: str, weights: LoraWeights) -> bool:
        """Load an adapter into free pages as soon as a request for it is seen, long before the
        request is scheduled; never evicts anything (it only uses what is free right now). The
        adapter stays cached (unpinned, LRU) until admission pins it. True when it is resident.
        While its pack is still running (CUDA: packs run in a worker) the load is deferred to
        `poll`, so the caller never waits for a pack."""
        self.poll()
        return self._prefetch_one(adapter_id, weights)

    def _prefetch_one(self, adapter_id: str, weights: LoraWeights) -> bool:
        if adapter_id in self._resident:
            return True
        self.stage(adapter_id, weights)
        if self.host.packing(adapter_id):
            self._deferred[adapter_id] = weights
            return False
        return self._prefetch_into_free_pages(adapter_id, weights)

    def prefetch_ahead(self, upcoming) -> None:
        """Prefetch the adapters of the requests next in line, (adapter_id, weights) in queue
        order, while their packs fit in half the host budget of packed adapters: deeper in the
        queue, a pack made now would be dropped by the host LRU before its request is admitted
        (and packed again, on the step's critical path)."""
        room = self.host.budget_bytes // 2
        page_bytes = self.spec.num_layers * self.pool.shape[2] * self.pool.element_size()
        seen: set[str] = set()
        for adapter_id, weights in upcoming:
            if adapter_id in seen or adapter_id in self._resident:
                continue
            seen.add(adapter_id)
            room -= self.pages_to_load(weights) * page_bytes
            if room < 0:
                break
            self._prefetch_one(adapter_id, weights)  # (the engine step polled just before)

    def poll(self) -> None:
        """Load deferred prefetches whose packs have finished, into free pages only (as prefetch).
        Cheap; meant for the start of each engine step (and run by every prefetch)."""
        self.host.settle()  # admit packs the worker finished (into the host LRU)
        if not self._deferred:
            return
        for adapter_id, weights in list(self._deferred.items()):
            if self.host.packing(adapter_id):
                continue
            del self._deferred[adapter_id]
            if adapter_id not in self._resident and adapter_id in self.host:  # (dropped by the host LRU: skip)
                self._prefetch_into_free_pages(adapter_id, weights)

    def _prefetch_into_free_pages(self, adapter_id: str, weights: LoraWeights) -> bool:
        if not self._free_slots or self.pages_to_load(weights) + self.prefetch_reserve_pages > self.allocator.num_free:
            return False
        self._load(adapter_id, weights)
        self._lru[adapter_id] = None
        self._evictable_pages += len(self._resident[adapter_id].pages)
        return True

    def pack_bytes(self, weights: LoraWeights) -> int:
        return self.host.pack_bytes(weights)

    def fit_host_budget(self, demand_bytes: int, step: bool) -> None:
        """The packs' host budget for this demand (host_budget.AdapterDemand.bytes), when it follows
        the work: up at once; down only by PackBudget.shrink_per_step each step (step=True)."""
        if self.pack_budget is not None:
            budget = self.pack_budget.next_budget(self.host.budget_bytes, demand_bytes, step)
            if budget != self.host.budget_bytes:
                self.host.resize(budget)

    def stage(self, adapter_id: str, weights: LoraWeights) -> None:
        """Start packing the adapter's host form (when its request arrives; on CUDA in a worker
        thread), so that loading it later only issues copies."""
        self.host.stage(adapter_id, weights)

    def release(self, adapter_id: str) -> None:
        res = self._resident[adapter_id]
        if res.pins <= 0:
            raise RuntimeError(f"adapter {adapter_id!r} released more often than acquired")
        res.pins -= 1
        if res.pins == 0:
            self._lru[adapter_id] = None  # most recently used: last out
            self._evictable_pages += len(res.pages)

    def evict_for(self, num_pages: int) -> None:
        """Evict least recently used unpinned adapters until `num_pages` more pages are free."""
        target = self.allocator.num_free + num_pages
        while self.allocator.num_free < target and self._lru:
            self._evict(next(iter(self._lru)))
        if self.allocator.num_free < target:
            raise RuntimeError(f"cannot free {num_pages} pages: every cached adapter is pinned")

    # --- internals -------------------------------------------------------------------------
    def _evict(self, adapter_id: str) -> None:
        res = self._resident.pop(adapter_id)
        del self._lru[adapter_id]
        self._ready(res)  # invariant (c) of adapter_upload.py: its pages and slot row go back to the main stream
        self._evictable_pages -= len(res.pages)
        self.allocator.free(res.pages, ("adapter", adapter_id))
        self.tables.ranks[res.slot].zero_()
        self._free_slots.append(res.slot)
        del self._targets[adapter_id]
        self.num_evictions += 1

    def _load(self, adapter_id: str, weights: LoraWeights) -> _Resident:
        layout = adapter_layout(weights, self.spec)
        n_pages = self.pages_to_load(weights)  # (a tensor-parallel cache counts its ranks' shares)
        if n_pages > self.max_pages_per_adapter:
            raise ValueError(f"adapter {adapter_id!r} needs {n_pages} pages, more than max_rank allows")
        if not self._free_slots:
            self._evict(next(iter(self._lru)))
        if n_pages > self.allocator.num_free:
            self.evict_for(n_pages - self.allocator.num_free)
        pages = self.allocator.allocate(n_pages, ("adapter", adapter_id))
        slot = self._free_slots.pop()
        res = _Resident(adapter_id, slot, pages, pins=0)
        packed = self.host.get(adapter_id, weights)
        t = time.perf_counter()
        res.ready = self._upload(slot, pages, packed)
        self.upload_s += time.perf_counter() - t
        self._resident[adapter_id] = res
        self._targets[adapter_id] = (max(layout.ranks),
                                     frozenset(name for name, r in zip(LORA_MODULES, layout.ranks) if r > 0))
        self.num_loads += 1
        return res

    def _ready(self, res: _Resident) -> None:
        """Make the main stream wait for the adapter's load (once; no host wait)."""
        if res.ready is not None:
            self.uploader.wait(res.ready)
            res.ready = None

    def _new_uploader(self) -> AdapterUploader | None:
        """What `_upload` copies with (its pinned ring and side stream are made here, once); a
        subclass that uploads its own way (TpAdapterCache) makes none."""
        return AdapterUploader(self.pool, self.tables)

    def _upload(self, slot: int, pages: list[int], packed) -> torch.cuda.Event | None:
        """Copy a pack into the slot's pages and table rows (CUDA: on the side stream; -> its event).
        The pack must be read before this returns (HostAdapterCache may reuse its buffer after)."""
        return self.uploader.load(slot, pages, packed)
