"""The engine's Python API: outputs, finish reasons, stop strings, aborts and input errors."""

from __future__ import annotations

import pytest

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids, generated_text


@pytest.fixture(scope="module")
def engine(zoo):
    return LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=64))


def _run_one(engine, rid, **kw):
    engine.add_request(rid, **kw)
    return engine.run_to_completion()[rid]


def test_text_is_the_decoded_tokens_and_indices_count_up(engine):
    outs = _run_one(engine, "t", prompt="The fox", params=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [o.index for o in outs] == list(range(16))
    ids = generated_ids(outs)
    assert generated_text(outs) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 16
    assert outs[-1].num_prompt_tokens == len(engine.tokenizer.encode("The fox"))


def test_stop_string_ends_generation_and_is_not_emitted(engine):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = generated_text(_run_one(engine, "full", prompt="Once", params=params))
    assert len(full) > 6
    stop = full[3:6]
    outs = _run_one(engine, "stopped", prompt="Once", params=SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))
    text = generated_text(outs)
    assert outs[-1].finish_reason == "stop" and stop not in text
    assert full.startswith(text) and len(text) == full.find(stop)


def test_eos_stops_unless_ignored(engine):
    eos = engine.eos_ids[0]
    engine.add_request("e", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=30, temperature=0))
    # Force EOS through the scheduler's update path: the fake token stands for a model choosing EOS.
    out = engine.scheduler.schedule()
    touched = engine.scheduler.update_from_output(out, {"e": eos}, engine.eos_ids)
    assert touched[0].finish_reason == "stop" and not engine.has_unfinished()
    engine._detok.pop("e", None)


def test_abort(engine):
    engine.add_request("a", prompt="Hello", params=SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort_request("a") and not engine.abort_request("a")
    assert not engine.has_unfinished()
    assert engine.kv.used_pages() == 0


def test_outputs_trail_the_gpu_by_one_step_and_the_last_one_is_never_lost(zoo):
    """Synchronous steps: step() returns the tokens sampled by the previous step (detokenized
    while this step runs). A request that finished in the last step still gets its final output,
    even if the caller aborts it meanwhile (abort says False: it was already finished)."""
    engine = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=64, async_scheduling=False))
    engine.add_request("lag", prompt="Hello", params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert engine.step() == []  # prefill: its token is sampled, not yet detokenized
    first = engine.step()  # decode of token 2; outputs: token 1
    assert [(o.index, o.finished) for o in first] == [(0, False)]
    assert not engine.abort_request("lag") and engine.has_unfinished()
    last = engine.step()  # nothing left to compute: the pending final output comes out
    assert [(o.index, o.finished, o.finish_reason) for o in last] == [(1, True, "length")]
    assert not engine.has_unfinished() and engine.kv.used_pages() == 0


def test_asynchronous_steps_read_each_step_back_after_launching_the_next(engine):
    """Asynchronous steps: step t+1 is launched before step t's ids are read, so outputs also trail
    by one step; a request is finished only once its last token is read back, and the step that
    reads it computes nothing more for it (its last token was known to be its last)."""
    assert engine.config.async_scheduling
    engine.add_request("lag", prompt="Hello", params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert engine.step() == []  # prefill launched; nothing read back yet
    first = engine.step()  # decode of token 2 launched, then token 1 read back
    assert [(o.index, o.finished) for o in first] == [(0, False)]
    launched = engine.scheduler.schedule()
    assert launched.empty  # token 2 is pending and is the last: nothing to compute
    last = engine.step()
    assert [(o.index, o.finished, o.finish_reason) for o in last] == [(1, True, "length")]
    assert not engine.has_unfinished() and engine.kv.used_pages() == 0


def test_an_abort_while_a_step_is_in_flight_drops_its_token(engine):
    engine.add_request("gone", prompt="Hello", params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()  # token 1 out, token 2 in flight
    assert engine.abort_request("gone") and not engine.has_unfinished() and engine.kv.used_pages() == 0
    assert engine.step() == []  # the in-flight step is read back: its token belongs to no one
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="x", prompt_token_ids=[1]), "exactly one"),
        (dict(prompt_token_ids=[1, 99999]), "outside"),
        (dict(prompt_token_ids=[1] * 500, params=SamplingParams(max_tokens=100)), "context"),
        (dict(prompt="x", adapter_id="only-id"), "go together"),
    ],
)
def test_bad_input_is_refused_with_the_reason(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", **kwargs)


def test_sampling_params_validation():
    for kw, match in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                      (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=("",)), "stop")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)


def test_adapters_deep_in_the_queue_are_packed_as_they_come_near_admission(zoo):
    """At arrival only requests within PREFETCH_AHEAD of the queue head get their adapter packed;
    the others are packed by a later step's lookahead, before admission needs them."""
    from lorafleet.engine.engine import PREFETCH_AHEAD
    from lorafleet.formats.lora_weights import load_peft_adapter_dir

    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=96, max_num_seqs=4))
    w = load_peft_adapter_dir(zoo.adapter("mha", "r1-attn"), eng.spec)
    n = PREFETCH_AHEAD + 6
    for i in range(n):  # one weights object under n ids: n adapters as far as the engine knows
        eng.add_request(f"q{i}", prompt_token_ids=[5, 6, 7], adapter_id=f"ad{i}", adapter=w,
                        params=SamplingParams(max_tokens=1, temperature=0))
    assert eng.adapters.host.num_packs == PREFETCH_AHEAD  # the deeper ones are not packed yet
    done = {o.request_id for o in eng.step()}  # the lookahead (before scheduling) sees the first 64: packed
    assert eng.adapters.host.num_packs == PREFETCH_AHEAD
    done |= {o.request_id for o in eng.step()}  # the queue moved by 4: the 4 now within reach are packed
    assert eng.adapters.host.num_packs == PREFETCH_AHEAD + 4
    done |= set(eng.run_to_completion())
    assert len(done) == n and eng.adapters.host.num_packs == n  # everyone served, nothing packed twice


def test_arrivals_pack_only_what_half_the_host_budget_holds_so_nothing_is_packed_twice(zoo):
    """Packing every arrival's adapter overran a small host budget: the LRU dropped the packs of the
    oldest waiting requests (the next admitted), which were then packed again on the engine
    thread. Arrivals now follow the lookahead's rule (half the budget, queue order)."""
    from lorafleet.engine.memory.adapter_pack import pack_adapter
    from lorafleet.formats.lora_weights import load_peft_adapter_dir

    # a fixed budget (packed_adapter_bytes > 0), set below to four packs
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=96, max_num_seqs=1, packed_adapter_bytes=1))
    w = load_peft_adapter_dir(zoo.adapter("mha", "r1-attn"), eng.spec)
    one = pack_adapter(w, eng.spec, eng.pool.shape[2], eng.pool.dtype).nbytes
    eng.adapters.host.budget_bytes = 4 * one
    eng.adapters.prefetch_reserve_pages = eng.kv.allocator.num_free  # no prefetch into pages: packs wait on the host
    for i in range(10):
        eng.add_request(f"q{i}", prompt_token_ids=[5, 6, 7], adapter_id=f"ad{i}", adapter=w,
                        params=SamplingParams(max_tokens=1, temperature=0))
    assert eng.adapters.host.num_packs == 2  # half the budget, from the queue head
    assert len(eng.run_to_completion()) == 10 and eng.adapters.host.num_packs == 10


def test_on_the_cpu_the_engine_takes_every_core_but_one_unless_told(zoo, monkeypatch):
    import torch

    from lorafleet.engine.runtime import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    assert cpu_threads(EngineConfig(model_dir="-")) == 7
    assert cpu_threads(EngineConfig(model_dir="-", cpu_threads=3)) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    assert cpu_threads(EngineConfig(model_dir="-")) == 1  # never zero threads
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(model_dir="-", cpu_threads=-1)
    before = torch.get_num_threads()
    try:
        LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=16, device="cpu", cpu_threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
