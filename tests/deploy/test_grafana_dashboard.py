"""deploy/grafana/lorafleet.json is a valid dashboard whose every query reads metrics the services
really export (names collected from the services' own registries, not a list kept by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from lorafleet.adapter_store.metrics import StoreCollector, StoreMetrics
from lorafleet.engine.serving.metrics import EngineMetrics
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.ingest.metrics import IngestMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lorafleet.json"
METRIC = re.compile(r"\b(?:lorafleet_|process_|vllm:)[a-zA-Z0-9_:]+")


def _exported() -> set[str]:
    """Every sample name the services' registries can expose (with _total/_bucket/... suffixes)."""
    registries = [EngineMetrics(5).registry, IngestMetrics().registry, StoreMetrics().registry,
                  GatewayMetrics().registry]
    # StoreCollector reads a store at scrape: an empty one stands in (only the names matter here)
    empty_cache = type("EmptyCache", (), {"__len__": lambda self: 0, "used_bytes": 0, "budget_bytes": 0, "loading": 0})
    store = SimpleNamespace(cache=empty_cache(), source=SimpleNamespace(stats=SimpleNamespace(fetches=0, bytes_read=0)),
                            spill=None)
    registries[2].register(StoreCollector(store))
    process = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=process)
    names = set()
    for registry in (*registries, process):
        for family in registry.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum", "_created"))
    return names


def test_the_dashboard_is_valid_and_reads_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lorafleet" and dash["panels"]
    exported = _exported()
    queries = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    assert len(queries) >= 20
    used = {name for q in queries for name in METRIC.findall(q)}
    assert used and used <= exported, sorted(used - exported)
    # it shows what an operator needs: throughput, latency percentiles, residency and loads, lag, errors
    joined = " ".join(queries)
    for needed in ("generated_tokens_total", "time_to_first_token_seconds_bucket", "inter_token_seconds_bucket",
                   "adapters_on_gpu", "adapter_loads_total", "kafka_lag", "ingest_rejected_total"):
        assert needed in joined, needed
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_the_check_catches_a_query_of_a_metric_nobody_exports():
    assert "lorafleet_engine_generated_tokens_total" in _exported()
    assert "lorafleet_engine_tokens_per_second" not in _exported()
