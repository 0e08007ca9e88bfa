"""The gateway's Prometheus metrics (served at /metrics by common/service_http.py, as every
service's): calls by endpoint and status, answers in flight, latency to the first token and to
the end, tokens streamed, and answers abandoned (the client went away, or the timeout)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; first tokens of a CPU demo to long answers of a loaded GPU fleet.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "lorafleet_gateway_"
        self.calls = Counter(p + "requests", "HTTP calls answered, by endpoint and status", ["endpoint", "status"],
                             registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "answers being generated (streaming or not)", registry=r)
        self.open_streams = Gauge(p + "reply_streams_open", "reply streams the gateway is reading", registry=r)
        self.first_token = Histogram(p + "time_to_first_token_seconds", "from the call to its first token",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(p + "request_duration_seconds", "from the call to its last token or error",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(p + "generated_tokens", "tokens answered, all choices", registry=r)
        self.abandoned = Counter(p + "abandoned", "answers given up before their end, their requests cancelled, "
                                 "by reason: disconnect (the client went away), timeout, shutdown", ["reason"],
                                 registry=r)
