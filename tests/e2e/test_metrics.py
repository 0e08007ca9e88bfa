"""Every service of `lorafleet up` serves /metrics, /health and /ready over HTTP; the engine's
metrics count what it really did (tokens, requests per adapter, first-token latencies, adapter
loads) and carry vLLM's `vllm:lora_requests_info` for LoRA-affinity routers."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, TokenReply
from tests.faults.up_stack import UpStack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    status, text = _get(url + "/metrics")
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_each_service_serves_metrics_and_probes_and_the_engine_counts_its_work(zoo, tmp_path):
    root = tmp_path / "adapters"
    for name in ("r1-attn", "r4-pattern"):
        shutil.copytree(zoo.adapter("mha", name), root / "t" / name)
    stack = UpStack(tmp_path, zoo.model("mha"), root).start()
    try:
        urls = stack.ready["metrics"]
        assert set(urls) == {"adapter-store", "ingest", "gateway", "engine-0"}
        for url in urls.values():
            for path in ("/health", "/ready"):
                status, body = _get(url + path)
                assert (status, body.split(":")[0]) == (200, "ok"), (url, path, body)
            assert _value(_samples(url), "process_cpu_seconds_total") > 0
        assert _get(urls["ingest"] + "/nothing")[0] == 404

        jobs = {"m-a1": "t/r1-attn", "m-a2": "t/r1-attn", "m-b": "t/r4-pattern", "m-base": None}
        tokens = {}
        async with LorafleetClient(stack.ready["kafka_bootstrap"], stack.ready["redis_url"]) as client:
            for rid, adapter in jobs.items():
                await client.submit({"id": rid, "adapter": adapter, "prompt_token_ids": [5, 9, 14, 20],
                                     "max_tokens": 5, "temperature": 0, "ignore_eos": True})
            await client.submit({"id": "m-bad", "prompt_token_ids": [5], "max_tokens": 0})  # invalid: max_tokens
            for rid in jobs:
                entries = [e async for e in client.replies(rid, timeout=120)]
                assert isinstance(entries[-1], DoneReply), entries[-1]
                tokens[rid] = sum(len(e.token_ids) for e in entries if isinstance(e, TokenReply))
            bad = [e async for e in client.replies("m-bad", timeout=60)]
            assert [type(e).__name__ for e in bad] == ["ErrorReply"] and bad[0].code == "invalid_request"

        m = _samples(urls["engine-0"])
        assert _value(m, "lorafleet_engine_generated_tokens_total") == sum(tokens.values()) == 20
        assert _value(m, "lorafleet_engine_adapter_requests_total", adapter="t/r1-attn") == 2
        assert _value(m, "lorafleet_engine_adapter_requests_total", adapter="t/r4-pattern") == 1
        assert _value(m, "lorafleet_engine_adapter_tokens_total", adapter="t/r1-attn") == 10
        assert _value(m, "lorafleet_engine_time_to_first_token_seconds_count") == 4
        assert _value(m, "lorafleet_engine_request_seconds_count") == 4
        assert _value(m, "lorafleet_engine_inter_token_seconds_count") == 16  # 4 tokens after the first, each
        assert _value(m, "lorafleet_engine_adapter_loads_total") >= 2
        assert _value(m, "lorafleet_engine_adapters_on_gpu") >= 2  # cached after use
        assert _value(m, "lorafleet_engine_requests_running") == 0
        assert _value(m, "lorafleet_engine_turn_seconds_count") > 0
        # Consumer lag per partition the engine holds, measured every 10 s: once the offsets of the
        # finished requests are committed, every partition's lag is 0.
        deadline, lags = time.monotonic() + 40, {}
        while time.monotonic() < deadline:
            lags = {dict(labels)["partition"]: v for (name, labels), v in _samples(urls["engine-0"]).items()
                    if name == "lorafleet_engine_kafka_lag"}
            if lags and set(lags.values()) == {0.0}:
                break
            await asyncio.sleep(1)
        assert lags and set(lags.values()) == {0.0}, lags
        info = [labels for (name, labels) in m if name == "vllm:lora_requests_info"]
        assert len(info) == 1
        labels = dict(info[0])
        assert labels["running_lora_adapters"] == "" and labels["waiting_lora_adapters"] == ""  # all done
        assert int(labels["max_lora"]) >= 2
        ingest = _samples(urls["ingest"])
        assert _value(ingest, "lorafleet_ingest_consumed_total") == 5
        assert _value(ingest, "lorafleet_ingest_routed_total", route="home") == 3  # one partition per adapter
        assert _value(ingest, "lorafleet_ingest_routed_total", route="base") == 1
        assert _value(ingest, "lorafleet_ingest_rejected_total", code="invalid_request") == 1
        store = _samples(urls["adapter-store"])
        assert _value(store, "lorafleet_store_adapters") == 2 and _value(store, "lorafleet_store_fetches_total") == 2
        assert _value(store, "lorafleet_store_requests_total", op="get", status="ok") >= 2
        assert _value(store, "lorafleet_store_get_seconds_count", cached="false") == 2  # each fetched once
        # While a long request runs, vLLM's gauge names its adapter among the running ones.
        async with LorafleetClient(stack.ready["kafka_bootstrap"], stack.ready["redis_url"]) as client:
            await client.submit({"id": "m-long", "adapter": "t/r4-pattern", "prompt_token_ids": [5, 9],
                                 "max_tokens": 500, "temperature": 0, "ignore_eos": True})
            seen, deadline = None, time.monotonic() + 60
            while seen is None and time.monotonic() < deadline:
                for (name, labels) in _samples(urls["engine-0"]):
                    if name == "vllm:lora_requests_info" and dict(labels)["running_lora_adapters"] == "t/r4-pattern":
                        seen = dict(labels)
                await asyncio.sleep(0.05)
            assert seen is not None, "the running adapter never appeared in vllm:lora_requests_info"
            running = _value(_samples(urls["engine-0"]), "lorafleet_engine_requests_running")
            await client.cancel("m-long")
            entries = [e async for e in client.replies("m-long", timeout=60)]
            assert type(entries[-1]).__name__ in ("ErrorReply", "DoneReply") and any(isinstance(e, TokenReply) for e in entries)
        assert running in (0, 1)
        stack.alive()
    finally:
        stack.stop()
