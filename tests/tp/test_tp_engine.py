"""LLMEngine(EngineConfig(tp_size=W)) on the CPU (gloo): the same greedy tokens as the one-process engine.

Each TP engine spawns W-1 worker processes; every test closes its engine (context manager), and
every wait inside is bounded (collective timeout, start-up wait, joins), so nothing can hang.
"""

from __future__ import annotations

import argparse

import pytest

from lorafleet.engine.engine import EngineConfig, LLMEngine, generated_ids
from lorafleet.engine.serving.config import EngineServiceConfig
from lorafleet.engine.tp.engine_workers import TensorParallelWorkerError
from lorafleet.engine.tp.partition import TensorParallelError
from tests.mixed_requests import add_mixed_requests

PROMPT_LENGTHS = (3, 17, 33)
MAX_TOKENS = 8
_single_cache: dict[tuple, dict[str, list[int]]] = {}


def _add_mixed(eng: LLMEngine, zoo, model: str) -> list[str]:
    return [rid for rid, _, _ in add_mixed_requests(eng, zoo, model, PROMPT_LENGTHS, MAX_TOKENS)]


def _config(zoo, model: str, num_pages: int, **extra) -> EngineConfig:
    return EngineConfig(model_dir=str(zoo.model(model)), device="cpu", num_pages=num_pages, max_batched_tokens=24,
                        tp_research_schemes=True, **extra)  # every scheme stays tested


def _single(zoo, model: str, num_pages: int) -> dict[str, list[int]]:
    """The one-process engine's greedy tokens (the reference every TP run must equal)."""
    key = (model, num_pages)
    if key not in _single_cache:
        eng = LLMEngine(_config(zoo, model, num_pages))
        _add_mixed(eng, zoo, model)
        _single_cache[key] = {rid: generated_ids(outs) for rid, outs in eng.run_to_completion().items()}
    return _single_cache[key]


# (model, world, scheme, pool pages): small pools make requests preempt and adapters evict.
CASES = [
    ("mha", 2, "fused", 256),
    ("mha", 2, "slora", 12),
    ("mha", 4, "fused", 14),
    ("gqa", 2, "fused", 24),
    ("gqa", 2, "slora", 20),
    # any world that divides the heads: 3 ranks (6 heads, 3 KV heads), 8 ranks (8 heads, KV heads replicated 4x)
    ("gqa6", 3, "slora", 24),
    ("gqa", 8, "fused", 256),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model,world,scheme,num_pages", CASES, ids=[f"{m}-W{w}-{s}-p{p}" for m, w, s, p in CASES])
def test_tp_engine_matches_single_process(zoo, model, world, scheme, num_pages):
    want = _single(zoo, model, num_pages)
    with LLMEngine(_config(zoo, model, num_pages, tp_size=world, tp_lora_scheme=scheme)) as eng:
        rids = _add_mixed(eng, zoo, model)
        results = eng.run_to_completion()
        stats = eng.scheduler_stats
        group = eng.model.group
        assert all(group.alive)
    assert not any(group.alive), "worker ranks still running after close()"
    got = {rid: generated_ids(outs) for rid, outs in results.items()}
    assert sorted(got) == sorted(rids)
    for rid in rids:
        assert got[rid] == want[rid], f"{model} W={world} {scheme} request {rid}: TP {got[rid]} != single {want[rid]}"
        assert results[rid][-1].finish_reason == "length"
    if num_pages < 100:
        assert stats["adapter_evictions"] > 0, stats
    if model == "mha" and num_pages < 100:
        assert stats["preemptions"] > 0, stats


@pytest.mark.timeout(120)
def test_tp_abort_and_close(zoo):
    want = _single(zoo, "mha", 256)
    eng = LLMEngine(_config(zoo, "mha", 256, tp_size=2))
    try:
        rids = _add_mixed(eng, zoo, "mha")
        results: dict[str, list] = {}
        for _ in range(3):
            for out in eng.step():
                results.setdefault(out.request_id, []).append(out)
        assert eng.scheduler.running and eng.scheduler.waiting
        running, waiting = eng.scheduler.running[0].request_id, eng.scheduler.waiting[-1].request_id
        assert eng.abort_request(running) and eng.abort_request(waiting)
        assert not eng.abort_request(running)  # already gone
        seen_before = {rid: len(results.get(rid, [])) for rid in (running, waiting)}
        for rid, outs in eng.run_to_completion().items():
            results.setdefault(rid, []).extend(outs)
        for rid in (running, waiting):
            assert len(results.get(rid, [])) == seen_before[rid], f"{rid} produced tokens after its abort"
        for rid in set(rids) - {running, waiting}:
            assert generated_ids(results[rid]) == want[rid], rid
    finally:
        eng.close()
    assert not any(eng.model.group.alive)
    eng.close()  # idempotent


@pytest.mark.timeout(60)
def test_a_dead_worker_is_an_error_not_a_hang(zoo):
    with LLMEngine(_config(zoo, "mha", 256, tp_size=2)) as eng:
        _add_mixed(eng, zoo, "mha")
        eng.step()
        worker = eng.model.group._procs[0]
        worker.kill()  # the worker this engine spawned (its own Process handle)
        worker.join(10)
        with pytest.raises(TensorParallelWorkerError, match="rank 1 exited"):
            eng.step()


def test_tp_config_is_checked_before_any_process_starts(zoo):
    with pytest.raises(ValueError, match="tp_size"):
        EngineConfig(model_dir="x", tp_size=0)
    with pytest.raises(ValueError, match="tp_lora_scheme"):
        EngineConfig(model_dir="x", tp_lora_scheme="megatron")
    for research in ("replicated_a", "gather_outputs"):  # benchmarks only, by name
        with pytest.raises(ValueError, match="TP_RESEARCH_SCHEMES"):
            EngineConfig(model_dir="x", tp_size=2, tp_lora_scheme=research)
        assert EngineConfig(model_dir="x", tp_size=2, tp_lora_scheme=research, tp_research_schemes=True)
    with pytest.raises(TensorParallelError, match="num_attention_heads 4"):
        LLMEngine(_config(zoo, "mha", 16, tp_size=3))


def _engine_config(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser()
    EngineServiceConfig.add_arguments(parser)  # flag defaults are read from the environment here
    return EngineServiceConfig.from_args(parser.parse_args(argv), model_dir="/models/m").engine


def test_engine_flags_pass_tp_settings_through(monkeypatch):
    monkeypatch.delenv("LORAFLEET_TP_SIZE", raising=False)
    monkeypatch.delenv("LORAFLEET_TP_LORA_SCHEME", raising=False)
    assert (_engine_config([]).tp_size, _engine_config([]).tp_lora_scheme) == (1, "fused")
    monkeypatch.setenv("LORAFLEET_TP_SIZE", "2")
    monkeypatch.setenv("LORAFLEET_TP_LORA_SCHEME", "slora")
    assert (_engine_config([]).tp_size, _engine_config([]).tp_lora_scheme) == (2, "slora")
    assert _engine_config(["--tp-size", "4"]).tp_size == 4  # the flag wins over the environment


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["fused", "slora"])
def test_tp_runtime_of_one_rank_matches_single_process(zoo, scheme):
    """The TP code path with W = 1 (no worker, a gloo group of one): what the GPU test runs at W = 1."""
    from lorafleet.engine.tp.engine_runtime import build_tp_runtime

    want = _single(zoo, "gqa", 24)
    with LLMEngine(_config(zoo, "gqa", 24, tp_lora_scheme=scheme), build_tp_runtime) as eng:
        assert eng.model.group.world == 1
        rids = _add_mixed(eng, zoo, "gqa")
        got = {rid: generated_ids(outs) for rid, outs in eng.run_to_completion().items()}
    assert {rid: got[rid] for rid in rids} == {rid: want[rid] for rid in rids}


@pytest.mark.timeout(60)  # a _leave that waits for the teardown hangs: this ends it
def test_leaving_the_group_is_bounded_when_teardown_blocks(monkeypatch, capsys):
    """A destroy_process_group that never returns (on GPUs: NCCL resources still referenced by
    captured graphs, or a peer gone) must not keep a worker or the driver's close() alive: _leave
    returns while the teardown is still blocked, and says so."""
    import threading

    import lorafleet.engine.tp.engine_workers as workers

    entered, release, returned = threading.Event(), threading.Event(), threading.Event()

    def blocked_teardown():
        entered.set()
        release.wait()  # until the test lets it go: a teardown that never returns by itself
        returned.set()

    monkeypatch.setattr(workers.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(workers.dist, "destroy_process_group", blocked_teardown)
    try:
        workers._leave(timeout_s=0.3)
        assert entered.is_set() and not returned.is_set(), "_leave waited for the teardown to return"
        assert "destroy_process_group did not return within 0.3 s" in capsys.readouterr().err
    finally:
        release.set()


def test_close_destroys_the_group_alongside_the_workers(monkeypatch):
    """NCCL's communicator destroy is an intra-node collective: the driver must destroy its group
    after telling the workers to stop and before joining them (joining first made every W = 2
    close on H200s wait 30 s for the bounded teardown, d18f232)."""
    import lorafleet.engine.tp.engine_workers as workers

    events = []

    class Conn:
        def send_bytes(self, raw):
            events.append("shutdown sent")

        def close(self):
            pass

    class Proc:
        exitcode = 0

        def join(self, timeout=None):
            events.append("joined")

        def is_alive(self):
            return False

    group = object.__new__(workers.TpWorkerGroup)
    group._procs, group._conns, group._closed, group.timeout_s = [Proc(), Proc()], [Conn(), Conn()], False, 1.0
    monkeypatch.setattr(workers, "_leave", lambda: events.append("group destroyed"))
    monkeypatch.setattr(workers, "end_process", lambda p: None)
    group.close()
    assert events == ["shutdown sent", "shutdown sent", "group destroyed", "joined", "joined"]
    group.close()  # idempotent
    assert len(events) == 5
