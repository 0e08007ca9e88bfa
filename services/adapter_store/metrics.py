"""The adapter store's Prometheus metrics (served at /metrics by common/service_http.py).

Requests are counted by the server as it answers them (op, reply status, whether the adapter was
already in shared memory, and how long the answer took: a miss fetches and validates). What the
store holds and what it read from object storage are read at scrape time from the store itself
(StoreCollector): a few integers, read from the scrape thread without a lock (each read is atomic).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

GET_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "lorafleet_store_"
        self.requests = Counter(p + "requests", "requests answered, by op and reply status (invalid: failed "
                                "validation; not_found; error: unavailable)", ["op", "status"], registry=r)
        self.invalid = Counter(p + "invalid_adapters", "adapters that failed validation, by reason", ["reason"],
                               registry=r)
        self.gets = Histogram(p + "get_seconds", "time to answer a get, by whether the adapter was in shared "
                              "memory already (false: fetched and validated)", ["cached"], buckets=GET_BUCKETS,
                              registry=r)

    def on_reply(self, op: str, status: str, message: str | None) -> None:
        self.requests.labels(op, status).inc()
        if status == "invalid":
            self.invalid.labels(invalid_reason(message or "")).inc()

    def watch(self, store) -> None:
        """Also report what `store` (a SharedMemoryStore) holds and read, at every scrape."""
        self.registry.register(StoreCollector(store))


# Reasons of InvalidAdapterError messages (formats/, source.py), first match wins: a bounded label.
_REASONS = (("pickle", "pickle"), ("missing", "missing_file"), ("JSON", "config"), ("adapter_config", "config"),
            ("not a LoRA", "tensor_names"), ("not targeted", "tensor_names"), ("shape", "shape"),
            ("NaN", "non_finite"), ("dtype", "dtype"), ("rank", "rank"), ("bytes", "size"))


def invalid_reason(message: str) -> str:
    return next((reason for word, reason in _REASONS if word in message), "other")


class StoreCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        cache, source = self.store.cache, self.store.source.stats
        for name, doc, value in (("adapters", "adapters in shared memory", len(cache)),
                                 ("bytes_used", "bytes of adapters in shared memory", cache.used_bytes),
                                 ("budget_bytes", "the shared-memory budget", cache.budget_bytes),
                                 ("loading", "adapters being fetched and validated now", cache.loading)):
            yield GaugeMetricFamily("lorafleet_store_" + name, doc, value=value)
        spill = self.store.spill
        yield GaugeMetricFamily("lorafleet_store_spilled_bytes", "bytes of adapters kept on local disk (spill)",
                                value=spill.used_bytes if spill is not None else 0)
        for name, doc, value in (("fetches", "adapters fetched from object storage", source.fetches),
                                 ("bytes_read", "bytes read from object storage", source.bytes_read)):
            yield CounterMetricFamily("lorafleet_store_" + name, doc, value=value)
