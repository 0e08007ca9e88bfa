"""The packed host form of an adapter (made once) and a byte-budgeted LRU of packed adapters.

A packed adapter is exactly what one load into the unified pool copies: the page buffer
`buf: [L, n_pages * P]` (every layer's virtual buffer, laid out as layout.py describes, zero
between matrices and past the end) and the rows of the device tables (ranks, scales, offsets).
Packs are plain (pageable) host tensors: the uploader copies them through its own pinned ring,
allocated once (adapter_upload.py), so packing never allocates pinned memory.

The HostAdapterCache keeps packed adapters by id, least recently used first, within a byte
budget: an adapter evicted from the pool and needed again costs one copy, not a repack.
NOTE: an adapter id names immutable weights (as in AdapterCache); a changed adapter needs a new id.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX, ModelSpec

from .layout import adapter_layout


@dataclass(frozen=True)
class PackedAdapter:
    buf: torch.Tensor  # [L, n_pages * P] pool dtype: the page buffer, page j of layer l = buf[l, j*P:(j+1)*P]
    ranks: torch.Tensor  # [L, 7] int32: the slot's `ranks` row
    scales: torch.Tensor  # [L, 7] float32: the slot's `scales` row
    offsets: torch.Tensor  # [2, 7] int64: the slot's a_off row, then its b_off row
    n_pages: int
    max_rank: int  # largest rank of any module (what the batch builder needs for grid sizes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.buf, self.ranks, self.scales, self.offsets))


def page_buffer_shape(weights: LoraWeights, spec: ModelSpec, page_elems: int) -> tuple[int, int]:
    """[L, n_pages * P]: the shape of the adapter's packed page buffer."""
    return spec.num_layers, adapter_layout(weights, spec).num_pages(page_elems) * page_elems


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.madvise
    except (OSError, AttributeError):  # not Linux / glibc: plain pages
        return None


def new_page_buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host buffer whose untouched pages are advised huge (Linux THP "madvise"
    mode): a fresh pack's cost was mostly 4 KiB page faults (bench/results/h200/NOTES.md)."""
    buf = torch.empty(shape, dtype=dtype)
    madvise, nbytes = _madvise(), buf.numel() * buf.element_size()
    start = -(-buf.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the buffer
    end = (buf.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal leaves plain pages
    return buf


def pack_adapter(weights: LoraWeights, spec: ModelSpec, page_elems: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> PackedAdapter:
    """Lay the adapter out as the pool holds it. Vectorized per (module, rank) group: the A
    matrices of all layers of one group are stacked and written with one copy (one more for the
    B^T), instead of two slice copies per (layer, module) target. `out`: a page buffer of the
    right shape and dtype to reuse (its old contents are cleared)."""
    layout = adapter_layout(weights, spec)
    shape = page_buffer_shape(weights, spec, page_elems)
    L, n_pages = shape[0], shape[1] // page_elems
    if out is None:
        buf = new_page_buffer(shape, dtype).zero_()
    else:
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out must be {list(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}")
        buf = out.zero_()
    ranks = torch.zeros(L, len(LORA_MODULES), dtype=torch.int32)
    scales = torch.zeros(L, len(LORA_MODULES), dtype=torch.float32)
    groups: dict[tuple[str, int], list[int]] = {}  # (module, rank) -> layers, in target order
    for t in weights.config.targets:
        groups.setdefault((t.module, t.rank), []).append(t.layer)
        ranks[t.layer, MODULE_INDEX[t.module]] = t.rank
        scales[t.layer, MODULE_INDEX[t.module]] = t.scale
    for (module, r), layers in groups.items():
        m = MODULE_INDEX[module]
        in_f, out_f = spec.module_shape(module)
        a = torch.stack([weights.a[(l, module)] for l in layers])  # [n, r, in]
        bt = torch.stack([weights.b[(l, module)] for l in layers]).transpose(1, 2)  # [n, r, out] (a view)
        a_region = buf[:, layout.a_off[m] : layout.a_off[m] + r * in_f]  # [L, r*in] view of buf
        b_region = buf[:, layout.b_off[m] : layout.b_off[m] + r * out_f]  # [L, r*out]
        if layers == list(range(L)):  # the usual case: every layer, one rank
            a_region.view(L, r, in_f).copy_(a)
            b_region.view(L, r, out_f).copy_(bt)
        else:  # some layers only (layers_to_transform) or per-layer ranks (rank_pattern)
            idx = torch.tensor(layers, dtype=torch.long)
            a_region[idx] = a.reshape(len(layers), -1).to(dtype)
            b_region[idx] = bt.reshape(len(layers), -1).to(dtype)
    offsets = torch.tensor([layout.a_off, layout.b_off], dtype=torch.int64)
    return PackedAdapter(buf, ranks, scales, offsets, n_pages, max(layout.ranks))


class PagePacker:
    """What HostAdapterCache packs: the pool's page form (the TP driver has its own packer:
    tp/grouped_adapter.GroupedPacker). shape: of the buffer a pack fills (spares are kept by it)."""

    def __init__(self, spec: ModelSpec, page_elems: int, dtype: torch.dtype):
        self.spec, self.page_elems, self.dtype = spec, page_elems, dtype

    def shape(self, weights: LoraWeights) -> tuple[int, int]:
        return page_buffer_shape(weights, self.spec, self.page_elems)

    def pack(self, weights: LoraWeights, out: torch.Tensor | None) -> PackedAdapter:
        return pack_adapter(weights, self.spec, self.page_elems, self.dtype, out=out)


SPARE_BYTES = 2 << 30  # page buffers of evicted packs kept for reuse, at most (and a quarter of the budget)


class SpareBuffers:
    """Page buffers of evicted packs, by shape, for the next packs of that shape: a fresh buffer
    costs its page faults on first touch (a reused one does not), and with thousands of adapters
    every new pack evicts an old one.
    Thread-safe: the caller's thread gives, the pack worker takes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._by_key: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.reused = 0  # packs made into a reused buffer (counter for tests and metrics)

    def give(self, buf: torch.Tensor) -> None:
        size = buf.numel() * buf.element_size()
        with self._lock:
            if self.bytes + size <= self.max_bytes:
                self._by_key.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)
                self.bytes += size

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        with self._lock:
            free = self._by_key.get((shape, dtype))
            if not free:
                return None
            buf = free.pop()
            self.bytes -= buf.numel() * buf.element_size()
            self.reused += 1
            return buf


class HostAdapterCache:
    """Packed adapters by id, LRU within `budget_bytes` (the newest one is kept even if larger).

    background: `stage` packs in `workers` threads (torch copies release the GIL), so a request's
    arrival costs the caller nothing and the packs overlap the engine's steps and each other;
    `get` waits only for a pack still running. Only the caller's thread touches the LRU and the
    pending map; the workers run the pure `pack_adapter` (and take spares, which lock). One
    worker was the S2 bottleneck: 128 MB rank-64 packs came ~100 ms apart. Packs in flight are
    not counted in the budget until they are settled (bounded by the distinct adapters of
    requests not yet admitted).
    """

    def __init__(self, spec: ModelSpec, page_elems: int, dtype: torch.dtype, budget_bytes: int,
                 background: bool = False, workers: int = 4, packer=None, max_budget_bytes: int | None = None):
        """packer: what a pack is (shape(weights), pack(weights, out) -> .buf, .nbytes); PagePacker by
        default. max_budget_bytes: the most `resize` may give (sizes the spare buffers; default: budget_bytes)."""
        if budget_bytes < 0:
            raise ValueError(f"the packed adapter budget must be >= 0 bytes, got {budget_bytes}")
        self.dtype = dtype
        self.packer = packer or PagePacker(spec, page_elems, dtype)
        self.budget_bytes = budget_bytes
        if workers < 1:
            raise ValueError(f"adapter pack threads must be >= 1, got {workers}")
        self.spares = SpareBuffers(min(max(budget_bytes, max_budget_bytes or 0) // 4, SPARE_BYTES))
        self._packed: OrderedDict = OrderedDict()  # id -> the packer's pack, least recently used first
        self._pending: dict[str, Future] = {}  # adapter id -> pack running in a worker
        self._unclaimed: set[str] = set()  # packed in the background and not yet taken by `get`
        self._worker = ThreadPoolExecutor(workers, thread_name_prefix="adapter-pack") if background else None
        self.used_bytes = 0
        self.num_packs = 0  # adapters packed (a hit packs nothing; counters for tests and metrics)
        self.wait_s = 0.0  # the caller's time in `get` waiting for a pack or packing (benchmarks)
        self.num_packed_on_demand = 0  # packs `get` had to make itself: none was staged or kept (the load waits)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._packed or adapter_id in self._pending

    def __len__(self) -> int:
        return len(self._packed)

    def ids(self) -> list[str]:
        return list(self._packed)

    def packing(self, adapter_id: str) -> bool:
        """Is the adapter's pack still running in the worker? (O(1): called per deferred adapter)"""
        pending = self._pending.get(adapter_id)
        return pending is not None and not pending.done()

    def stage(self, adapter_id: str, weights: LoraWeights) -> None:
        """Have the adapter packed soon (now, or in the worker); a packed one becomes most recent.
        O(1): finished packs are admitted by `settle` (each engine step) or `get`."""
        if adapter_id in self._packed:
            self._packed.move_to_end(adapter_id)
        elif adapter_id not in self._pending:
            if self._worker is None:
                self._admit(adapter_id, self._pack(weights))
            else:
                self._pending[adapter_id] = self._worker.submit(self._pack, weights)

    def get(self, adapter_id: str, weights: LoraWeights):
        self.settle()
        packed = self._packed.get(adapter_id)
        self._unclaimed.discard(adapter_id)
        if packed is not None:
            self._packed.move_to_end(adapter_id)
            return packed
        pending = self._pending.pop(adapter_id, None)
        t = time.perf_counter()
        if pending is None:
            self.num_packed_on_demand += 1
        packed = pending.result() if pending is not None else self._pack(weights)  # waits only for a running pack
        self.wait_s += time.perf_counter() - t
        self._admit(adapter_id, packed)
        return packed

    def pack_bytes(self, weights: LoraWeights) -> int:
        """Host bytes the adapter's pack takes (without packing it)."""
        return math.prod(self.packer.shape(weights)) * self.dtype.itemsize

    def resize(self, budget_bytes: int) -> None:
        """A new budget (host_budget.PackBudget). A smaller one takes effect as new packs come in:
        packs in hand are not thrown away while nothing needs their room (a lull between bursts
        would otherwise drop exactly the packs the next burst's popular adapters reuse)."""
        self.budget_bytes = budget_bytes

    def _pack(self, weights: LoraWeights):
        """(Worker thread.) Into a recycled page buffer of the right shape when there is one."""
        out = self.spares.take(self.packer.shape(weights), self.dtype)
        return self.packer.pack(weights, out)

    def settle(self) -> None:
        """Admit packs the worker finished (a failed one is dropped: `get` packs again and raises)."""
        for adapter_id in [k for k, f in self._pending.items() if f.done()]:
            done = self._pending.pop(adapter_id)
            if done.exception() is None:
                self._unclaimed.add(adapter_id)
                self._admit(adapter_id, done.result())

    def _admit(self, adapter_id: str, packed) -> None:
        self.num_packs += 1
        self._packed[adapter_id] = packed
        self.used_bytes += packed.nbytes
        while self.used_bytes > self.budget_bytes and len(self._packed) > 1:
            # Packs a load has taken go first (least recent first), then unclaimed ones (staged
            # for a waiting request; the oldest staged is the soonest needed, so LRU order alone
            # would drop exactly it when parallel packs settle together).
            victim = next((k for k in self._packed if k not in self._unclaimed and k != adapter_id), None)
            if victim is None:
                victim = next(iter(self._packed))
            self._unclaimed.discard(victim)
            old = self._packed.pop(victim)
            self.used_bytes -= old.nbytes
            # Invariant: nothing else holds an evicted pack. `get` hands a pack to a load that
            # reads it synchronously (copy into the pinned ring, or into the pool on the CPU)
            # before this thread admits anything else, so its buffer is free to reuse.
            self.spares.give(old.buf)
