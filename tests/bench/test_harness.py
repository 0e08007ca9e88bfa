"""The benchmark harness itself: the S-LoRA workload as specified, engine-level runs on CPU (one
engine reused across runs), the merged-model baseline's math, the roofline bound, the summary."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.engine_bench import run_once
from lorafleet.bench.hf_baseline import StepClock, build_peft_model
from lorafleet.bench.hf_baseline import serve as hf_serve
from lorafleet.bench.merged_baseline import merge_adapter, plan
from lorafleet.bench.roofline import Shape, estimate
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.summary import main as summary_main
from lorafleet.bench.workload import SETTINGS, generate_trace
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.formats.model_spec import ModelSpec


def test_trace_is_deterministic_and_follows_the_distributions():
    a = generate_trace(100, alpha=1.0, rate=20.0, cv=1.0, duration=200)
    assert a == generate_trace(100, alpha=1.0, rate=20.0, cv=1.0, duration=200)  # seed 42
    assert len(a) == 4000
    gaps = np.diff([0.0] + [r.arrival for r in a])
    assert abs(gaps.mean() - 1 / 20) < 0.005 and abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # Gamma, cv 1
    assert min(r.input_len for r in a) >= 8 and max(r.input_len for r in a) < 512
    assert min(r.output_len for r in a) >= 8 and max(r.output_len for r in a) < 512
    counts = np.bincount([r.adapter for r in a], minlength=100)
    assert counts.min() > 15  # alpha = 1: uniform popularity
    skewed = np.bincount([r.adapter for r in generate_trace(100, 0.1, 20.0, 1.0, 200)], minlength=100)
    assert skewed[:50].sum() > 5 * skewed[50:].sum()  # power(0.1) piles up near adapter 0
    bursty = np.diff([r.arrival for r in generate_trace(10, 1.0, 20.0, 4.0, 200)])
    assert bursty.std() / bursty.mean() > 2.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model_folder("tiny", tmp_path_factory.mktemp("tiny") / "tiny")


def test_adapter_bank_is_deterministic_per_number(tiny):
    spec = ModelSpec.from_pretrained(tiny)
    one, two = (AdapterBank(spec, (8, 4), SETTINGS["tiny"].modules, torch.device("cpu")) for _ in range(2))
    a, b = one.get(3), two.get(3)
    assert a.config.rank == 4 and one.get(2).config.rank == 8  # round robin over ranks
    assert all(torch.equal(a.a[k], b.a[k]) and torch.equal(a.b[k], b.b[k]) for k in a.a)
    assert a.a[(0, "q_proj")].shape == (4, 64) and a.b[(1, "o_proj")].shape == (64, 4)
    assert not torch.equal(one.get(5).a[(0, "q_proj")], one.get(7).a[(0, "q_proj")])


def test_one_engine_serves_consecutive_runs(tiny):
    engine = LLMEngine(EngineConfig(model_dir=str(tiny), random_weights_seed=0, num_pages=256))
    setting = SETTINGS["tiny"]
    bank = AdapterBank(engine.spec, setting.ranks, setting.modules, torch.device("cpu"))
    trace = generate_trace(3, 1.0, 50.0, 1.0, 0.2, input_range=(8, 16), output_range=(4, 8))
    first = run_once(engine, bank, trace, engine.spec.vocab_size, tag="n3")
    assert first["requests"] == len(trace) and first["throughput_req_s"] > 0
    assert first["adapter_loads"] == first["distinct_adapters"] == len({r.adapter for r in trace})
    assert 0.0 <= first["slo_6s"] <= 1.0 and first["ttft_p50_s"] <= first["ttft_p99_s"]
    assert engine.kv.used_pages() == 0 and engine.adapters.cached_ids()  # idle; run 1's adapters cached
    again = run_once(engine, bank, trace, engine.spec.vocab_size, tag="again")
    # the same engine again: its own ids, counters are this run's, and run 1's adapters were cleared first
    assert again["requests"] == len(trace) and again["adapter_loads"] == first["adapter_loads"]
    assert again["adapter_evictions"] == 0
    assert all(a.startswith("again-") for a in engine.adapters.cached_ids())
    base = run_once(engine, None, trace, engine.spec.vocab_size, tag="base")
    assert base["requests"] == len(trace) and base["adapter_loads"] == 0 and base["peak_adapter_gb"] == 0


def test_merged_model_generates_what_the_lora_engine_generates(tiny):
    cfg = EngineConfig(model_dir=str(tiny), random_weights_seed=0, num_pages=128)
    lora, merged = LLMEngine(cfg), LLMEngine(cfg)
    w = AdapterBank(lora.spec, (8,), SETTINGS["tiny"].modules, torch.device("cpu")).get(1)
    for k in list(w.b):  # a visible adapter: large B, so a wrong merge changes the tokens
        w.b[k] = w.b[k] * 300
    merge_adapter(merged, w)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(5, 21))
    lora.add_request("x", prompt_token_ids=prompt, params=params, adapter_id="a1", adapter=w)
    merged.add_request("x", prompt_token_ids=prompt, params=params)
    plain = LLMEngine(cfg)
    plain.add_request("x", prompt_token_ids=prompt, params=params)
    want, got = generated_ids(lora.run_to_completion()["x"]), generated_ids(merged.run_to_completion()["x"])
    assert got == want and generated_ids(plain.run_to_completion()["x"]) != want


def test_merged_plan_fits_a_few_copies_only(tiny):
    spec = ModelSpec.from_pretrained(make_model_folder("7b", tiny.parent / "7b"))
    pages, reason = plan(spec, "7b", 5, 140 << 30, 0.9, 16384)
    assert pages * 16 >= 16384 and not reason
    pages, reason = plan(spec, "7b", 100, 140 << 30, 0.9, 16384)
    assert pages == 0 and "100 copies" in reason


def test_roofline_orders_settings_and_adapter_counts():
    trace = generate_trace(2000, 1.0, 50.0, 1.0, 15.0)
    s1 = {n: estimate(SETTINGS["S1"], trace, n)["throughput_req_s"] for n in (0, 5, 2000, 10000)}
    assert s1[0] >= s1[5] >= s1[2000] >= s1[10000] and 35 < s1[2000] < 60
    s2 = estimate(SETTINGS["S2"], trace, 2000)["throughput_req_s"]
    s4 = estimate(SETTINGS["S4"], trace, 2000)["throughput_req_s"]
    assert s4 < s2 < s1[2000]
    assert Shape.named("7b").weight_bytes == pytest.approx(13.5e9, rel=0.02)


def test_summary_marks_targets(tmp_path, monkeypatch):
    def rec(mode, n, rps):
        return {"setting": "S1", "mode": mode, "n": n, "throughput_req_s": rps, "ttft_p50_s": 1.0,
                "ttft_p90_s": 2.0, "ttft_p99_s": 3.0}

    env = {"commit": "abc", "gpu": "H200", "date": "now", "command": "x"}
    records = [rec("lora", 5, 40.0), rec("lora", 2000, 31.0), rec("lora", 10000, 30.0), rec("base-only", 0, 40.0),
               {**rec("hf-peft", 5, 0.1), "served": 9, "offered": 64},
               rec("roofline", 2000, 45.0), {"setting": "S1", "mode": "merged", "n": 100, "fits": False, "reason": "too big"}]
    (tmp_path / "engine-S1.json").write_text(json.dumps({"environment": env, "records": records}))
    monkeypatch.setattr("sys.argv", ["summary", "--dir", str(tmp_path), "--settings", "S1"])
    summary_main()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "31.00 req/s, 103% of 30 (**pass**)" in text
    assert "78% of base-only (**miss**)" in text and "75% of n = 5 (**miss**)" in text
    assert "does not fit: too big" in text and "| lora | 2000 | 31.00 |" in text and "69% |" in text
    assert "| hf-peft (9 of 64 served) | 5 | 0.10 |" in text
    # --also: another call's results (an S2 run here) join the tables; the summary's own folder is untouched
    other = tmp_path / "other"
    other.mkdir()
    s2 = [{**rec("lora", 2000, 27.0), "setting": "S2"}]
    (other / "engine-S2.json").write_text(json.dumps({"environment": env, "records": s2}))
    monkeypatch.setattr("sys.argv", ["summary", "--dir", str(tmp_path), "--settings", "S1", "S2", "--also", str(other)])
    summary_main()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "S2 within 15% of S1 at n = 2000: 87% of S1 (**pass**)" in text and f"`{other / 'engine-S2.json'}`" in text
    assert not (other / "SUMMARY.md").exists()


def test_a_failed_run_is_recorded_before_the_error_propagates(tmp_path, monkeypatch):
    import lorafleet.bench.engine_bench as eb

    def boom(*_a, **_k):
        raise RuntimeError("out of pages")

    monkeypatch.setattr(eb, "run_once", boom)
    monkeypatch.setattr("sys.argv", ["eb", "--setting", "tiny", "--n", "5", "--duration", "0.1", "--max-len", "12",
                                     "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError):
        eb.main()
    records = json.loads((tmp_path / "engine-tiny.json").read_text())["records"]
    assert records == [{**records[0], "error": "RuntimeError: out of pages"}] and records[0]["n"] == 5
    assert "failed: RuntimeError: out of pages" in (tmp_path / "engine-tiny.md").read_text()


def test_merged_serve_routes_requests_by_adapter(tiny):
    from lorafleet.bench.merged_baseline import serve

    cfg = EngineConfig(model_dir=str(tiny), random_weights_seed=0, num_pages=64)
    engines = {0: LLMEngine(cfg), 2: LLMEngine(cfg)}
    trace = [r for r in generate_trace(3, 1.0, 50.0, 1.0, 0.3, input_range=(8, 12), output_range=(3, 5)) if r.adapter != 1]
    assert trace and trace[-1].index >= len(trace)  # indices with gaps, as a filtered trace has
    result = serve(engines, trace, engines[0].spec.vocab_size, "t")
    assert result["requests"] == len(trace) and not any(e.has_unfinished() for e in engines.values())


def test_hf_baseline_batches_wait_to_fill_and_every_offered_request_is_served(tiny):
    """HF's static batches start full (or after max_wait_s), not with the lone request of t = 0."""
    setting = SETTINGS["tiny"]
    spec = ModelSpec.from_pretrained(tiny)
    bank = AdapterBank(spec, setting.ranks, setting.modules, torch.device("cpu"))
    trace = generate_trace(3, 1.0, 200.0, 1.0, 0.05, input_range=(8, 16), output_range=(4, 8))[:6]
    assert len(trace) == 6 and trace[3].arrival < 1.0
    model = build_peft_model(tiny, bank, sorted({r.adapter for r in trace}), device="cpu")
    full = hf_serve(model, trace, batch=4, vocab=spec.vocab_size, device="cpu", max_wait_s=5.0)
    assert full["batch_sizes"] == [4, 2] and full["served"] == full["offered"] == 6
    assert full["span_s"] >= trace[3].arrival - trace[0].arrival  # the first batch waited for its 4th request
    assert full["generated_tokens"] == 4 * max(r.output_len for r in trace[:4]) + 2 * max(r.output_len for r in trace[4:])
    eager = hf_serve(model, trace, batch=4, vocab=spec.vocab_size, device="cpu", max_wait_s=0.0)
    assert eager["batch_sizes"][0] == 1 and sum(eager["batch_sizes"]) == 6
    cut = hf_serve(model, trace, batch=6, vocab=spec.vocab_size, device="cpu", budget_s=0.0)  # deadline at once
    assert cut["batch_sizes"] == [] and cut["served"] == 0 and cut["offered"] == 6
    clock = StepClock(time.perf_counter(), deadline_s=-1.0)  # past: a running batch stops after its next token
    ids = torch.full((2, 8), 5, dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             adapter_names=[f"a{trace[0].adapter}"] * 2, stopping_criteria=[clock])
    assert len(clock.times) == 1 and out.shape == (2, 9)
