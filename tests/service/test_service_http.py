"""ServiceHttp: /metrics in Prometheus' text format, /health and /ready from the service's checks
(200 ok, 503 with every reason, a crashing check reported as a reason), 404 elsewhere, and a
clear error when its port is taken."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from lorafleet.common.service_http import ServiceHttp


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_probes_answer_from_the_service():
    registry = CollectorRegistry()
    Counter("demo_events", "events", registry=registry).inc(3)
    state = {"live": [], "ready": ["Kafka at x unreachable", "Redis unreachable"]}

    def problems(mode):
        if state.get("crash"):
            raise RuntimeError("boom")
        return state[mode]

    http = ServiceHttp(0, registry, problems, host="127.0.0.1").start()
    try:
        status, body = _get(http.port, "/metrics")
        assert status == 200 and "demo_events_total 3.0" in body
        assert _get(http.port, "/health") == (200, "ok: live\n")
        assert _get(http.port, "/ready") == (503, "unhealthy: Kafka at x unreachable; Redis unreachable\n")
        state["ready"] = []
        assert _get(http.port, "/ready") == (200, "ok: ready\n")
        state["crash"] = True
        status, body = _get(http.port, "/health")
        assert status == 503 and "RuntimeError: boom" in body
        assert _get(http.port, "/other")[0] == 404
        with pytest.raises(OSError, match="--metrics-port 0"):
            ServiceHttp(http.port, registry, problems, host="127.0.0.1")
    finally:
        http.stop()
