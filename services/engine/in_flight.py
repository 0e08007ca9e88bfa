"""Steps launched whose sampled ids the host has not read yet, and the copies that bring them back.

Asynchronous scheduling keeps up to two steps unread: step t is read back after step t+1 was
launched. Each step's ids are therefore copied to the host right after its sampling is queued (on
the device's stream, so before the next step's kernels), into one of two pinned buffers, with an
event of their own: waiting for step t's ids never waits for step t+1's forward. Buffer
t % 2 is reused by step t+2, launched only after step t was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class InFlightStep:
    sched: SchedulerOutput
    sampled: list[ScheduledRequest]  # the requests that sample, in the order of `ids`
    ids: torch.Tensor | None  # [N] int64 on the device, still being computed (None: nothing sampled)
    host: torch.Tensor | None = None  # [N] int64 pinned: the copy of ids (CUDA)
    ready: torch.cuda.Event | None = None  # recorded after the copy (CUDA)
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    def row_of(self, request_id: str) -> int:
        """Index in `ids` of a request's token (the next step reads it on the device)."""
        if not self._rows:
            self._rows = {e.request.request_id: i for i, e in enumerate(self.sampled)}
        return self._rows[request_id]


class SampledIdsReadback:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._buffers = [torch.empty(512, dtype=torch.int64, pin_memory=True) for _ in range(2)] if self.cuda else []
        self._next = 0

    def launched(self, sched: SchedulerOutput, sampled: list[ScheduledRequest], ids: torch.Tensor | None) -> InFlightStep:
        """A step whose sampling was just queued: start the copy of its ids to the host (no wait)."""
        step = InFlightStep(sched, sampled, ids)
        if ids is None or not self.cuda:
            return step
        n, buf = ids.shape[0], self._buffers[self._next]
        if buf.numel() < n:
            buf = self._buffers[self._next] = torch.empty(max(n, 2 * buf.numel()), dtype=torch.int64, pin_memory=True)
        self._next ^= 1
        step.host = buf[:n]
        step.host.copy_(ids, non_blocking=True)
        step.ready = torch.cuda.Event()
        step.ready.record()
        return step

    @staticmethod
    def read(step: InFlightStep) -> list[int]:
        """Wait for the step's ids (the step's one host-device synchronisation) and read them."""
        if step.ids is None:
            return []
        if step.ready is None:
            return step.ids.tolist()
        step.ready.synchronize()
        return step.host.tolist()
