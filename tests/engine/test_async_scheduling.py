"""Asynchronous scheduling (the engine's default) emits exactly what one step at a time emits.

Both engines run the same script of arrivals and aborts over a pool small enough to preempt and
evict, with greedy and seeded sampling, stop strings, max_tokens 1 and every zoo adapter; their
outputs must be equal field by field (ids, text, index, finish reason, counts), every request's
indices must count up from 0 with exactly one final output, and the asynchronous engine must leave
the device idle less (it launches each step while the previous one is in flight).
"""

from __future__ import annotations

import dataclasses

import pytest

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_text
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.mixed_requests import prompt_ids
from tests.zoo import ADAPTERS

NAMES = (None, *ADAPTERS)


def _jobs(stops: dict[str, str]) -> list[tuple[int, str, dict]]:
    """(step at which to add it, request id, add_request kwargs) in arrival order."""
    jobs = []
    for i in range(18):
        name = NAMES[i % len(NAMES)]
        if i % 3 == 0:
            params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
        elif i % 3 == 1:
            params = SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, top_k=40, seed=i, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=1 if i % 4 == 2 else 8, temperature=0.7, ignore_eos=True)
        rid = f"q{i}"
        if rid in stops:
            params = dataclasses.replace(params, stop=(stops[rid],))
        jobs.append((i // 3, rid, dict(prompt_token_ids=prompt_ids(3 + (5 * i) % 29, i), params=params,
                                      adapter_id=name)))
    return jobs


def _run(zoo, weights, async_scheduling: bool, stops: dict[str, str], abort: tuple[int, str] | None = None):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=14, max_batched_tokens=24,
                                 max_num_seqs=6, async_scheduling=async_scheduling))
    jobs, outputs, step = _jobs(stops), {}, 0
    while jobs or eng.has_unfinished():
        while jobs and jobs[0][0] <= step:
            _, rid, kw = jobs.pop(0)
            name = kw["adapter_id"]
            eng.add_request(rid, adapter=None if name is None else weights[name], **kw)
        if abort is not None and step == abort[0]:
            eng.abort_request(abort[1])
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 2000, "the engine did not drain"
    return eng, outputs


@pytest.fixture(scope="module")
def weights(zoo):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=14))
    return {name: load_peft_adapter_dir(zoo.adapter("mha", name), eng.spec) for name in ADAPTERS}


@pytest.fixture(scope="module")
def stops(zoo, weights) -> dict[str, str]:
    """Stop strings that really occur mid-generation: two characters of an earlier run's text."""
    _, outs = _run(zoo, weights, False, {})
    picked = {}
    for rid in ("q0", "q3", "q4"):
        text = generated_text(outs[rid])
        assert len(text) >= 6, f"{rid} generated too little text to pick a stop string: {text!r}"
        picked[rid] = text[3:5]
    return picked


def _check_exactly_once(outputs: dict) -> None:
    for rid, outs in outputs.items():
        indices = [i for o in outs for i in range(o.index, o.index + len(o.new_token_ids))]
        assert indices == list(range(len(indices))), f"{rid}: indices {indices}"
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, rid


def test_asynchronous_steps_emit_what_synchronous_steps_emit(zoo, weights, stops):
    sync_eng, sync = _run(zoo, weights, False, stops)
    async_eng, asynced = _run(zoo, weights, True, stops)
    assert sorted(asynced) == sorted(sync) == sorted(f"q{i}" for i in range(18))
    for rid in sync:
        assert asynced[rid] == sync[rid], rid
    _check_exactly_once(asynced)
    assert {sync[rid][-1].finish_reason for rid in stops} == {"stop"}
    assert any(len(outs) == 1 and outs[0].num_output_tokens == 1 for outs in sync.values())  # max_tokens 1
    for eng in (sync_eng, async_eng):  # the script is hard enough to matter, and everything is given back
        assert eng.scheduler_stats["preemptions"] > 0 and eng.adapters.num_evictions > 0
        assert eng.kv.num_requests == 0 and eng.adapters.resident_pages() == eng.kv.allocator.num_used
    # the synchronous engine leaves the device idle between steps; the asynchronous one only
    # when a step found nothing in flight (start-up, drained queues)
    assert async_eng.device_idle_seconds < sync_eng.device_idle_seconds


@pytest.mark.parametrize("abort_step", [2, 5, 9])
def test_an_abort_mid_flight_emits_a_prefix_and_leaves_the_others_untouched(zoo, weights, stops, abort_step):
    _, full = _run(zoo, weights, False, stops)
    for async_scheduling in (False, True):
        eng, outs = _run(zoo, weights, async_scheduling, stops, abort=(abort_step, "q1"))
        for rid in full:
            if rid != "q1":
                assert outs[rid] == full[rid], (async_scheduling, rid)
        got = [t for o in outs.get("q1", []) for t in o.new_token_ids]
        want = [t for o in full["q1"] for t in o.new_token_ids]
        assert got == want[: len(got)], "an aborted request emits a prefix of its tokens"
        assert not any(o.finished for o in outs.get("q1", [])[:-1])
        assert eng.kv.num_requests == 0
