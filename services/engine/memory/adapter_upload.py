"""Copies packed adapters into the unified pool: on a CUDA side stream, overlapped with the forward
passes running on the main stream, or in place on the CPU (no streams, no events).

::

    host (pageable pack) --memcpy--> pinned ring half --DMA--> device staging --index_copy_--> pool[l0:l1, pages]
    page row, ranks, scales, a_off, b_off --> pinned rows of the slot --DMA--> tables[slot]
                                                            event --> wait_event (acquire / evict)

Every buffer the copies use is allocated ONCE here: a pinned ring of two halves, a device staging
buffer and pinned table rows per slot. Nothing is pinned or allocated per load: allocating pinned
memory (cudaHostAlloc) is slow and can stall other CUDA calls, and allocating device memory next
to a nearly full pool can make the caching allocator free and synchronise. Packs are plain
(pageable) host memory, made by a worker thread that never calls CUDA; a load costs the host one
memcpy per chunk (a few ms for 16 MB) and queues the rest. Layers go in chunks of at most half the
ring.

Invariants (CUDA):
(a) the pages and the slot given to a load may have held KV or another adapter that the main
    stream wrote or read in earlier steps: the side stream first waits for all work queued on the
    main stream so far (wait_stream records an event there; no host wait), then overwrites them.
(b) a pinned buffer is rewritten by the host only after the DMA that read it completed: each ring
    half and each slot's table rows carry the event of the last copy out of them, which the host
    waits for before writing (it is almost always long done: a half is reused two chunks later).
    The device staging buffer is only used on the side stream, so stream order protects it.
(c) nothing on the main stream may touch what a load writes before the load completed: the owner
    (AdapterCache) calls `wait(event)` when the adapter is pinned for a step (before the forward
    that reads it) and when it is evicted (before its pages go to KV or another adapter on the
    main stream, and before its table row is zeroed there).
"""

from __future__ import annotations

from collections import deque

import torch

from ..ops.base import AdapterTables
from .adapter_pack import PackedAdapter

DEFAULT_MAX_STAGING_BYTES = 64 << 20


class AdapterUploader:
    def __init__(self, pool: torch.Tensor, tables: AdapterTables, max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES):
        self.pool = pool  # [L, num_pages, P]
        self.tables = tables
        self.on_cuda = pool.device.type == "cuda"
        self.stream = torch.cuda.Stream(pool.device) if self.on_cuda else None
        S, max_pages = tables.page_table.shape
        P, esize = pool.shape[2], pool.element_size()
        # A ring half holds at least one whole layer of the widest adapter (chunks are whole layers).
        self.half_elems = max(max_staging_bytes // (2 * esize), max_pages * P)
        pinned = dict(pin_memory=self.on_cuda)
        if self.on_cuda:
            self._ring = torch.empty(2, self.half_elems, dtype=pool.dtype, **pinned)  # [2, half] host
            self._ring_done: list[torch.cuda.Event | None] = [None, None]
            self._next_half = 0
            self._staging = torch.empty(self.half_elems, dtype=pool.dtype, device=pool.device)  # [half] device
        # Pinned table rows, one per slot: [S, max_pages], [S, L, 7], [S, L, 7], [S, 2, 7].
        self._rows = torch.zeros(S, max_pages, dtype=torch.int32, **pinned)
        self._ranks = torch.zeros(tables.ranks.shape, dtype=torch.int32, **pinned)
        self._scales = torch.zeros(tables.scales.shape, dtype=torch.float32, **pinned)
        self._offsets = torch.zeros(S, 2, tables.a_off.shape[1], dtype=torch.int64, **pinned)
        self._row_reader: dict[int, torch.cuda.Event] = {}  # slot -> event of the last load that read its rows
        self._inflight: deque[torch.cuda.Event] = deque()  # loads not yet seen complete, oldest first

    @property
    def in_flight(self) -> int:
        """Loads whose completion has not been observed yet (always 0 on the CPU)."""
        self._retire()
        return len(self._inflight)

    def load(self, slot: int, pages: list[int], packed: PackedAdapter) -> torch.cuda.Event | None:
        """Write `packed` into `pages` and the tables' row `slot`. On CUDA: queued on the side
        stream, returns the event that completes with it; on the CPU: done on return, None."""
        if len(pages) != packed.n_pages:
            raise ValueError(f"the packed adapter fills {packed.n_pages} pages, {len(pages)} were given")
        last = self._row_reader.pop(slot, None)
        if last is not None:
            last.synchronize()  # invariant (b): the slot's pinned rows are free again (long done, in practice)
        self._rows[slot].zero_()
        self._rows[slot, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self._ranks[slot].copy_(packed.ranks)
        self._scales[slot].copy_(packed.scales)
        self._offsets[slot].copy_(packed.offsets)
        if not self.on_cuda:
            self._write(slot, len(pages), packed)
            return None
        self._retire()
        self.stream.wait_stream(torch.cuda.current_stream(self.pool.device))  # invariant (a)
        with torch.cuda.stream(self.stream):
            self._write(slot, len(pages), packed)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._inflight.append(done)
        self._row_reader[slot] = done
        return done

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Order the main (current) stream after a load; the host does not wait. Invariant (c)."""
        if event is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until every queued load is done (tests, shutdown)."""
        if self.stream is not None:
            self.stream.synchronize()
        self._retire()

    def _retire(self) -> None:
        while self._inflight and self._inflight[0].query():
            self._inflight.popleft()

    def _write(self, slot: int, n: int, packed: PackedAdapter) -> None:
        """The copies themselves, on the current stream (the side stream on CUDA)."""
        t, pool = self.tables, self.pool
        nb = dict(non_blocking=True)
        t.page_table[slot].copy_(self._rows[slot], **nb)
        t.ranks[slot].copy_(self._ranks[slot], **nb)
        t.scales[slot].copy_(self._scales[slot], **nb)
        t.a_off[slot].copy_(self._offsets[slot, 0], **nb)
        t.b_off[slot].copy_(self._offsets[slot, 1], **nb)
        idx = t.page_table[slot, :n].long()  # [n] page ids on the pool's device (stream-ordered after the row copy)
        L, P = pool.shape[0], pool.shape[2]
        step = max(1, min(L, self.half_elems // (n * P)))  # whole layers per chunk
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            src = packed.buf[l0:l1]  # [l1-l0, n*P] host rows (contiguous)
            if self.on_cuda:
                src = self._through_ring(src)
            pool[l0:l1].index_copy_(1, idx, src.view(l1 - l0, n, P))

    def _through_ring(self, src: torch.Tensor) -> torch.Tensor:
        """memcpy a pageable chunk into the next pinned ring half, DMA it to the device staging
        buffer on the current (side) stream; returns the staging view. Invariant (b)."""
        h = self._next_half
        self._next_half ^= 1
        if self._ring_done[h] is not None:
            self._ring_done[h].synchronize()
        numel = src.numel()
        host = self._ring[h, :numel].view(src.shape)
        host.copy_(src)
        dev = self._staging[:numel].view(src.shape)
        dev.copy_(host, non_blocking=True)
        self._ring_done[h] = torch.cuda.Event()
        self._ring_done[h].record()
        return dev
