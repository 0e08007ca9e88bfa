"""The engine service's engine thread: every LLMEngine call runs on one thread that is not the
event loop's, a turn aborts before it admits and admits before it steps, and refusals and step
failures come back to the event loop as that request's error entry."""

from __future__ import annotations

import asyncio
import threading

from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply, WorkItem
from lorafleet.common.replies import RequestState
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.engine import RequestOutput
from lorafleet.engine.serving.config import EngineServiceConfig
from lorafleet.engine.serving.engine_thread import EngineThread
from lorafleet.engine.serving.jobs import Job
from lorafleet.engine.serving.service import EngineService


class RecordingEngine:
    """Serves each request one token per step until max_tokens; notes every call and its thread."""

    def __init__(self, fail_steps: int = 0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.left: dict[str, int] = {}
        self.made: dict[str, int] = {}
        self.fail_steps = fail_steps

    def _note(self, name: str) -> None:
        self.calls.append((name, threading.get_ident()))

    def has_unfinished(self) -> bool:
        self._note("has_unfinished")
        return bool(self.left)

    def add_request(self, request_id, *, prompt_token_ids, params, adapter_id, adapter, arrival):
        self._note("add")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.left[request_id], self.made[request_id] = params.max_tokens, 0

    def abort_request(self, request_id) -> None:
        self._note("abort")
        self.left.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        self._note("step")
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("a broken kernel")
        outputs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            finished = self.left[rid] == 0
            outputs.append(RequestOutput(rid, [7], "x", self.made[rid], finished, "length" if finished else None,
                                         3, self.made[rid] + 1))
            self.made[rid] += 1
            if finished:
                del self.left[rid]
        return outputs


class MemoryWriter:
    """ReplyWriter's publish contract, in memory: every entry appended, terminal once."""

    def __init__(self) -> None:
        self.streams: dict[str, list] = {}

    async def publish(self, entries):
        for _stream, rid, entry in entries:
            self.streams.setdefault(rid, []).append(entry)
        return {rid: RequestState(sum(len(e.token_ids) for e in got if isinstance(e, TokenReply)),
                                  any(isinstance(e, (DoneReply, ErrorReply)) for e in got))
                for rid, got in self.streams.items()}


def _job(service: EngineService, rid: str, prompt: list[int], max_tokens: int = 3) -> Job:
    item = WorkItem(id=rid, adapter=None, prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                    top_k=0, seed=None, stop=[], ignore_eos=True, reply_stream=f"lorafleet:out:{rid}",
                    submitted_at=0.0, received_at=1e12)
    job = Job(item, [], log=service.log)
    service.jobs[rid] = job
    service._make_ready(job)
    return job


def _service(engine, thread: EngineThread | None = None) -> EngineService:
    cfg = EngineServiceConfig("127.0.0.1:1", "redis://127.0.0.1:1/0", "127.0.0.1:1", EngineConfig(model_dir="-"))
    return EngineService(cfg, engine, MemoryWriter(), store=None, thread=thread)


async def _serve_until_settled(service: EngineService) -> None:
    for _ in range(100):
        await service.step_once()
        if not service.jobs:
            return
    raise AssertionError(f"requests still in flight: {list(service.jobs)}")


async def test_every_engine_call_runs_on_one_thread_that_is_not_the_loops():
    engine = RecordingEngine()
    service = _service(engine)
    for i in range(4):
        _job(service, f"r{i}", [1, 2, 3])
    await _serve_until_settled(service)
    threads = {ident for _name, ident in engine.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    for i in range(4):
        tokens = [e for e in service.writer.streams[f"r{i}"] if isinstance(e, TokenReply)]
        assert [e.index for e in tokens] == [0, 1, 2] and isinstance(service.writer.streams[f"r{i}"][-1], DoneReply)


async def test_the_engine_is_built_and_closed_on_the_thread_that_serves_it():
    thread = EngineThread()
    built_on = await thread.call(threading.get_ident)
    engine = RecordingEngine()
    service = _service(engine, thread)
    _job(service, "r0", [1])
    await _serve_until_settled(service)
    assert {ident for _name, ident in engine.calls} == {built_on}
    thread.shutdown()


async def test_a_turn_aborts_then_admits_then_steps():
    engine = RecordingEngine()
    service = _service(engine)
    _job(service, "old", [1], max_tokens=50)
    await service.step_once()
    engine.calls.clear()
    service.to_abort.append("old")
    _job(service, "new", [1])
    await service.step_once()
    assert [name for name, _ in engine.calls][:4] == ["abort", "add", "has_unfinished", "step"]


async def test_a_refused_admission_and_a_failed_step_end_their_requests_with_error_entries():
    engine = RecordingEngine(fail_steps=1)
    service = _service(engine)
    _job(service, "empty", [])
    _job(service, "unlucky", [1])
    await _serve_until_settled(service)
    refused, failed = service.writer.streams["empty"][-1], service.writer.streams["unlucky"][-1]
    assert isinstance(refused, ErrorReply) and refused.code == "invalid_request" and "empty" in refused.message
    assert isinstance(failed, ErrorReply) and failed.code == "internal_error"
    await asyncio.sleep(0)
    assert not engine.left, "the request of the failed step was aborted in the engine"


async def test_a_stuck_engine_thread_cannot_keep_the_process_alive():
    """A step stuck on a hung GPU: shutdown gives up after its timeout, and the thread is a daemon
    (the process exits after the drain; the liveness probe restarts the pod)."""
    release = threading.Event()
    thread = EngineThread()
    stuck = asyncio.ensure_future(thread.call(release.wait, 30))
    await asyncio.sleep(0.05)
    assert thread.shutdown(timeout_s=0.1) is False and thread._thread.daemon
    release.set()
    assert await stuck is True
    assert thread.shutdown(timeout_s=5) is True


async def test_errors_reach_the_caller():
    thread = EngineThread()

    def broken():
        raise KeyError("no such request")

    try:
        await thread.call(broken)
    except KeyError as exc:
        assert "no such request" in str(exc)
    else:
        raise AssertionError("the error was swallowed")
    assert await thread.call(sum, [1, 2]) == 3  # the thread survives it
    thread.shutdown()
