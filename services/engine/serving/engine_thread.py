"""The one thread that runs LLMEngine code in the engine service, and what one turn of it does.

Why a thread of its own: torch's CPU intra-op (OpenMP) thread pool belongs to the thread that runs
an op. Stepping from asyncio.to_thread's rotating worker threads, beside the ops that admission
ran on the event loop's thread, made every CPU step about twice as slow as the same step run in
one thread (bench/results/service-overhead/NOTES.md). One thread, from the engine's construction
to its close, is also the whole of the engine's locking: nothing else ever calls it.

A turn: the aborts, then the admissions (a refusal for each request add_request refused), then
one step if any request is unfinished. The event loop hands the turn its input and applies the
result (service.py); the turn touches nothing but the engine, and reads the jobs it admits.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from .jobs import Job, sampling_params
from .metrics import EngineStats, engine_stats
from .stall_watch import StallWatch


@dataclass
class EngineTurn:
    refused: list[tuple[Job, Exception]]  # admissions that add_request refused or crashed on
    outputs: list  # the step's RequestOutputs (empty when no step ran or it failed)
    stepped: bool  # a step ran (it may have raised)
    step_error: Exception | None  # the step raised
    unfinished: bool  # the engine holds unfinished requests after the step
    stats: EngineStats | None = None  # the engine's state after the turn (when asked for: metrics)
    seconds: float = 0.0  # the turn's wall time


class EngineThread:
    """One daemon thread; `call` runs a function on it and awaits the result. Daemon: a step stuck
    on a hung GPU or a dead collective must not keep the process alive after the service has
    drained and given up on it (the liveness probe restarts the pod)."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()  # (fn, args, future) or None to stop
        self._thread = threading.Thread(target=self._serve, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            fn, args, future = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the awaiting caller, whatever it is
                    future.set_exception(exc)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future: Future = Future()
        self._work.put((fn, args, future))
        return await asyncio.wrap_future(future)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Stop after the calls queued so far; False when the thread is still busy after timeout_s."""
        self._work.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def run_turn(engine, watch: StallWatch, aborts: list[str], admits: list[Job], with_stats: bool = False) -> EngineTurn:
    """On the engine thread: abort, admit, step once (between watch.started and watch.finished);
    with_stats: also copy the engine's state out for the metrics (metrics.engine_stats)."""
    started = time.perf_counter()
    for request_id in aborts:
        engine.abort_request(request_id)
    refused = []
    for job in admits:
        item = job.item
        try:
            engine.add_request(item.id, prompt_token_ids=item.prompt_token_ids, params=sampling_params(item),
                               adapter_id=item.adapter, adapter=job.adapter, arrival=item.received_at)
        except Exception as exc:  # one request's refusal (ValueError) or crash must not stop the others
            refused.append((job, exc))
    outputs, error, stepped = [], None, engine.has_unfinished()
    if stepped:
        try:
            outputs = watch.timed(engine.step)
        except Exception as exc:
            error = exc
    stats = engine_stats(engine) if with_stats else None
    return EngineTurn(refused, outputs, stepped, error, engine.has_unfinished(), stats, time.perf_counter() - started)
