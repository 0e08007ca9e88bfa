"""Every lorafleet pod, in every overlay, exposes its /metrics port and says so to Prometheus: a
container port named `metrics` at the services' LORAFLEET_METRICS_PORT, and the prometheus.io
annotations naming the same port."""

from __future__ import annotations

import pytest

from lorafleet.common import settings

from .manifests import OVERLAYS, rendered

SERVICES = {"ingest", "engine", "adapter-store", "gateway"}


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_service_pod_exposes_and_announces_its_metrics_port(overlay):
    port = settings.ENV_VARS["METRICS_PORT"].default
    seen = set()
    for obj in rendered(overlay):
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = obj["spec"]["template"]
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        annotations = pod["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", (overlay, component)
        assert annotations.get("prometheus.io/port") == str(port) and annotations.get("prometheus.io/path") == "/metrics"
        main = next(c for c in pod["spec"]["containers"] if c["args"][0] in SERVICES)
        ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
        assert ports.get("metrics") == port, (overlay, component, ports)
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        assert env.get("LORAFLEET_METRICS_PORT", str(port)) == str(port)
        seen.add(main["args"][0])
    assert seen == SERVICES
