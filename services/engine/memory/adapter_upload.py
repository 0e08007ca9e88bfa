"""Copies packed adapters into the unified pool: on a CUDA side stream, overlapped with the forward
passes running on the main stream, or in place on the CPU (no streams, no events).

::

    host (pinned)                  side stream                                    main stream
    packed.buf[l0:l1] --DMA--> staging [l1-l0, n, P] --index_copy_--> pool[l0:l1, pages]
    page row, ranks, scales,
    a_off, b_off      --DMA--> tables[slot]                 event --> wait_event (acquire / evict)

The host never blocks: it queues the copies, records an event and returns. Layers are copied in
chunks so the device staging buffer stays under `max_staging_bytes`.

Invariants (CUDA):
(a) the pages and the slot given to a load may have held KV or another adapter that the main
    stream wrote or read in earlier steps: the side stream first waits for all work queued on the
    main stream so far (wait_stream records an event there; no host wait), then overwrites them.
(b) pinned sources must outlive the copies reading them: each load keeps its host tensors with its
    event until the event has completed (`_retire`), whatever the host LRU drops meanwhile.
    Staging buffers are allocated on the side stream, so the caching allocator reuses them only
    for later side-stream work (stream order), never for the main stream's.
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
        self.max_staging_bytes = max_staging_bytes
        self.on_cuda = pool.device.type == "cuda"
        self.stream = torch.cuda.Stream(pool.device) if self.on_cuda else None
        # [S, max_pages] host page-table rows, one per slot, pinned once here: allocating pinned
        # memory per load could synchronize the device (cudaHostAlloc), i.e. block the host.
        self._rows = torch.zeros(tables.page_table.shape, dtype=torch.int32, pin_memory=self.on_cuda)
        self._row_reader: dict[int, torch.cuda.Event] = {}  # slot -> event of the last load that read its row
        # (event, host tensors its copies read), oldest first; one stream, so events complete in order.
        self._inflight: deque[tuple[torch.cuda.Event, tuple]] = deque()

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
        row = self._rows[slot]  # [max_pages]
        last = self._row_reader.get(slot)
        if last is not None and not last.query():  # invariant (b): a load still reads it; take a fresh one (rare)
            row = torch.zeros(row.shape, dtype=torch.int32, pin_memory=True)
        row.zero_()
        row[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        if not self.on_cuda:
            self._write(slot, len(pages), row, packed)
            return None
        self._retire()
        self.stream.wait_stream(torch.cuda.current_stream(self.pool.device))  # invariant (a)
        with torch.cuda.stream(self.stream):
            self._write(slot, len(pages), row, packed)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._inflight.append((done, (row, packed)))  # invariant (b)
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
        while self._inflight and self._inflight[0][0].query():
            self._inflight.popleft()

    def _write(self, slot: int, n: int, row: torch.Tensor, packed: PackedAdapter) -> None:
        """The copies themselves, on the current stream (the side stream on CUDA)."""
        t, pool = self.tables, self.pool
        t.page_table[slot].copy_(row, non_blocking=True)
        t.ranks[slot].copy_(packed.ranks, non_blocking=True)
        t.scales[slot].copy_(packed.scales, non_blocking=True)
        t.a_off[slot].copy_(packed.offsets[0], non_blocking=True)
        t.b_off[slot].copy_(packed.offsets[1], non_blocking=True)
        idx = t.page_table[slot, :n].long()  # [n] page ids on the pool's device (stream-ordered after the row copy)
        L, P = pool.shape[0], pool.shape[2]
        layer_bytes = n * P * pool.element_size()
        step = max(1, min(L, self.max_staging_bytes // max(1, layer_bytes)))
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            src = packed.buf[l0:l1]  # [l1-l0, n*P] host rows (contiguous)
            if self.on_cuda:
                src = src.to(pool.device, non_blocking=True)  # staging: one DMA from pinned memory
            pool[l0:l1].index_copy_(1, idx, src.view(l1 - l0, n, P))
