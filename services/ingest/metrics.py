"""The ingest service's Prometheus metrics (served at /metrics by common/service_http.py): what
it consumed and what became of each request. Counted by BatchHandler on the event loop."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "lorafleet_ingest_"
        self.consumed = Counter(p + "consumed", "messages read from the requests topic", registry=r)
        self.routed = Counter(p + "routed", "requests sent to the work topic, by route: base (no adapter), home "
                              "(the adapter's one partition: adapter affinity), spread (a hot adapter), "
                              "hash (LORAFLEET_INGEST_ROUTING=hash)", ["route"], registry=r)
        self.rejected = Counter(p + "rejected", "requests answered with an error entry, by code", ["code"], registry=r)
        self.dead_lettered = Counter(p + "dead_lettered", "messages sent to the dead-letter topic", registry=r)
        self.duplicates = Counter(p + "duplicates", "deliveries of an id already in the same batch", registry=r)
