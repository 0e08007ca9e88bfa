"""The engine's metrics arithmetic: per-adapter series only for the top adapters, each holding
that adapter's whole count (never shrinking); counters advanced by what the engine's own totals
gained between turns; vLLM's gauge carrying the current adapters only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from lorafleet.engine.serving.metrics import AdapterTopK, EngineMetrics, EngineStats


def _series(registry: CollectorRegistry, name: str) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for f in registry.collect() for s in f.samples if s.name == name}


def test_only_the_top_adapters_get_series_and_each_keeps_its_whole_count():
    registry = CollectorRegistry()
    top = AdapterTopK(k=2)
    registry.register(top)
    for adapter, requests in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(requests):
            top.add(adapter, 1, 10)
    assert _series(registry, "lorafleet_engine_adapter_requests_total") == {(("adapter", "a"),): 3, (("adapter", "c"),): 2}
    for _ in range(5):
        top.add("b", 1, 1)  # b overtakes both: c leaves the top, a stays with its whole count
    assert _series(registry, "lorafleet_engine_adapter_requests_total") == {(("adapter", "b"),): 6, (("adapter", "a"),): 3}
    assert _series(registry, "lorafleet_engine_adapter_tokens_total") == {(("adapter", "b"),): 15, (("adapter", "a"),): 30}


def _stats(**kw) -> EngineStats:
    base = dict(running=0, waiting=0, kv_pages=0, free_pages=10, adapter_pages=0, adapters_on_gpu=0, adapters_packed=0,
                packed_bytes=0, adapter_slots=64, adapter_loads=0, adapter_evictions=0, packs_on_demand=0,
                preemptions=0, running_adapters=(), waiting_adapters=())
    return EngineStats(**{**base, **kw})


def test_counters_advance_by_the_engines_gains_and_the_lora_gauge_shows_the_current_adapters():
    m = EngineMetrics(5)
    m.on_turn(_stats(adapter_loads=2, running=1, running_adapters=("x",), waiting_adapters=("y", "z")), 0.01)
    m.on_turn(_stats(adapter_loads=5, preemptions=1, running_adapters=("y",)), 0.02)
    m.on_turn(_stats(adapter_loads=5, preemptions=1, running_adapters=("y",)), 0.02)
    assert _series(m.registry, "lorafleet_engine_adapter_loads_total") == {(): 5}
    assert _series(m.registry, "lorafleet_engine_preemptions_total") == {(): 1}
    assert _series(m.registry, "lorafleet_engine_requests_running") == {(): 0}
    (labels,) = _series(m.registry, "vllm:lora_requests_info")
    assert dict(labels) == {"running_lora_adapters": "y", "waiting_lora_adapters": "", "max_lora": "64"}
    assert _series(m.registry, "lorafleet_engine_turn_seconds_count") == {(): 3}


def test_the_request_done_log_carries_first_token_total_and_decode_speed():
    from types import SimpleNamespace

    from lorafleet.engine.serving.jobs import done_latencies

    job = SimpleNamespace(item=SimpleNamespace(received_at=100.0), first_token_at=100.25)
    assert done_latencies(job, tokens=11, now=101.25) == {"first_token_s": 0.25, "total_s": 1.25, "tokens_per_s": 10.0}
    job.first_token_at = 0.0  # ended before its first token (an abort, a deadline)
    assert done_latencies(job, tokens=0, now=100.5) == {"first_token_s": None, "total_s": 0.5, "tokens_per_s": None}


def test_invalid_adapters_are_counted_by_a_bounded_reason():
    from lorafleet.adapter_store.metrics import StoreMetrics, invalid_reason

    cases = {
        "adapter_model.safetensors is missing in x (found ['adapter_model.bin']: pickle files are never loaded)": "pickle",
        "adapter_config.json is missing in s3://b/a": "missing_file",
        "adapter_config.json is not valid JSON: Expecting value": "config",
        "lora_A of layer 0 q_proj has shape (4, 8), expected (4, 64) from r and the base model": "shape",
        "lora_B of layer 1 v_proj holds NaN or Inf values": "non_finite",
        "something nobody foresaw": "other",
    }
    assert {message: invalid_reason(message) for message in cases} == cases
    m = StoreMetrics()
    m.on_reply("get", "invalid", "lora_B of layer 1 v_proj holds NaN or Inf values")
    m.on_reply("get", "ok", None)
    assert _series(m.registry, "lorafleet_store_invalid_adapters_total") == {(("reason", "non_finite"),): 1}
    assert _series(m.registry, "lorafleet_store_requests_total") == {
        (("op", "get"), ("status", "invalid")): 1, (("op", "get"), ("status", "ok")): 1}
