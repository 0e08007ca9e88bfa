"""The gateway (the OpenAI-compatible HTTP API) in every overlay: a CPU-only, stateless Deployment
running `lorafleet gateway`, whose probes run the gateway's own checks against the topic and Redis
it uses; a ClusterIP Service whose port 80 (`http`) reaches the port the gateway listens on; a CPU
HorizontalPodAutoscaler on that Deployment; a disruption budget that keeps one pod; the API key
only from the Secret; the base model served under the name set in the config map. The example
Ingress (deploy/k8s/gateway-ingress.example.yaml) points at that Service and lets long streamed
answers and the largest bodies through.

The generic checks cover the gateway too: schemas (test_manifests_schema), variables declared and
args/probes parsed into a GatewayConfig (test_manifests_cli), metrics port and annotations
(test_manifests_metrics), probes, grace period, Services, autoscalers, budgets and resources
(test_manifests_wiring)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet.cli import build_parser
from lorafleet.common import settings
from tests.deploy.manifests import (
    OVERLAYS,
    Container,
    container_env,
    find,
    flag_value,
    gateway_ingress_example,
    lorafleet_containers,
    pod_labels,
    probes,
    quantity,
    rendered,
    selected_workloads,
)

NAME = "lorafleet-gateway"  # the Deployment, Service, HorizontalPodAutoscaler and budget
ANY_ADDRESS = ("0.0.0.0", "::", "")


def _gateway(objects: list[dict]) -> Container:
    (gateway,) = [c for c in lorafleet_containers(objects) if c.subcommand == "gateway"]
    return gateway


def _parse(argv: list[str], env: dict[str, str], monkeypatch):
    """`lorafleet ...` parsed under exactly `env` (flag defaults come from it)."""
    for name in [n for n in os.environ if n.startswith(settings.PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_is_a_cpu_deployment_running_lorafleet_gateway(overlay):
    objects = rendered(overlay)
    gateway = _gateway(objects)
    assert (gateway.workload["kind"], gateway.workload["metadata"]["name"]) == ("Deployment", NAME)
    assert gateway.spec["command"] == ["lorafleet"] and gateway.spec["args"][0] == "gateway"
    assert pod_labels(gateway.workload)["app.kubernetes.io/component"] == "gateway"
    # Stateless and GPU-free: no GPU, no GPU node placement, nothing from the node or the models volume.
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in gateway.spec["resources"].get(kind, {}), f"{gateway.where}: no GPU needed"
    assert "nvidia.com/gpu.present" not in gateway.pod.get("nodeSelector", {})
    assert not [t for t in gateway.pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    for volume in gateway.pod.get("volumes", []):
        assert set(volume) <= {"name", "emptyDir"}, f"{gateway.where}: volume {volume['name']} is not scratch space"
    # An asyncio proxy: a CPU request for the autoscaler to measure against, and modest memory.
    requests, limits = gateway.spec["resources"]["requests"], gateway.spec["resources"]["limits"]
    assert 0 < quantity(requests["cpu"]) <= quantity(limits["cpu"]) <= 4
    assert 256 * 2**20 <= quantity(requests["memory"]) <= quantity(limits["memory"]) <= 4 * 2**30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_check_the_topic_and_redis_the_gateway_uses(overlay, monkeypatch):
    objects = rendered(overlay)
    gateway = _gateway(objects)
    env = container_env(gateway, objects)
    served = _parse(gateway.spec["args"], env, monkeypatch)
    ready_file = flag_value(gateway.spec["args"], "--ready-file")
    expected = {"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "live"}
    found = probes(gateway)
    assert found.keys() == expected.keys()
    for kind, probe in found.items():
        command = probe["exec"]["command"]
        assert command == ["lorafleet", "gateway", "--check", expected[kind], "--ready-file", ready_file], kind
        checked = _parse(command[1:], env, monkeypatch)
        # services/health.py's gateway check: Kafka with this requests topic, Redis at this URL
        for field in ("kafka_bootstrap", "requests_topic", "redis_url", "ready_file"):
            assert getattr(checked, field) == getattr(served, field), f"{kind} checks another {field}"
    assert served.redis_url == env["LORAFLEET_REDIS_URL"] and served.redis_url.startswith("redis")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_service_reaches_the_port_the_gateway_listens_on(overlay, monkeypatch):
    objects = rendered(overlay)
    gateway = _gateway(objects)
    service = find(objects, "Service", NAME)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selected_workloads(objects, service["spec"]["selector"]) == [gateway.workload], "gateway pods alone"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert port["port"] == 80 and port.get("protocol", "TCP") == "TCP"
    target = port["targetPort"]
    (container_port,) = [p for p in gateway.spec["ports"] if target in (p["name"], p["containerPort"])]
    args = _parse(gateway.spec["args"], container_env(gateway, objects), monkeypatch)
    assert args.port == container_port["containerPort"], f"the gateway listens on {args.port}, not {target}"
    assert args.host in ANY_ADDRESS, f"the gateway listens on {args.host} only: the Service cannot reach it"
    # The Service carries the API only; /metrics is scraped from the pods (PodMonitor, annotations).
    ports = {p["name"]: p["containerPort"] for p in gateway.spec["ports"]}
    assert ports["metrics"] == args.metrics_port != args.port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_autoscaler_scales_the_gateway_deployment_on_cpu(overlay):
    objects = rendered(overlay)
    gateway = _gateway(objects)
    hpa = find(objects, "HorizontalPodAutoscaler", NAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert gateway.workload["apiVersion"] == "apps/v1"
    assert "replicas" not in gateway.workload["spec"], "the autoscaler owns replicas"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Shrink only after a calm window: each pod that goes drains its open streams.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    assert not [o for o in objects if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == NAME]
    budget = find(objects, "PodDisruptionBudget", NAME)
    assert budget["spec"]["minAvailable"] == 1 < hpa["spec"]["minReplicas"]
    assert selected_workloads(objects, budget["spec"]["selector"]["matchLabels"]) == [gateway.workload]


def test_overlays_size_the_gateway_autoscaler():
    assert find(rendered("base"), "HorizontalPodAutoscaler", NAME)["spec"]["maxReplicas"] == 20
    assert find(rendered("single-gpu-node"), "HorizontalPodAutoscaler", NAME)["spec"]["maxReplicas"] == 4
    for overlay in ("production", "tensor-parallel"):
        spread = _gateway(rendered(overlay)).pod["topologySpreadConstraints"]
        assert spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_settings_secrets_and_served_model_name(overlay, monkeypatch):
    from lorafleet.gateway.config import GatewayConfig

    objects = rendered(overlay)
    gateway = _gateway(objects)
    env = container_env(gateway, objects)
    for name in env:
        if name.startswith(settings.PREFIX):
            assert name[len(settings.PREFIX):] in settings.ENV_VARS, f"{gateway.where}: {name} is not declared"
    # Secrets come from the Secret: the Redis URL (required) and the API key (optional: no auth).
    refs = {v["name"]: v.get("valueFrom", {}).get("secretKeyRef") for v in gateway.spec["env"]}
    assert refs["LORAFLEET_REDIS_URL"] == {"name": "lorafleet-secrets", "key": "LORAFLEET_REDIS_URL"}
    assert refs["LORAFLEET_GATEWAY_API_KEY"] == {"name": "lorafleet-secrets", "key": "LORAFLEET_GATEWAY_API_KEY",
                                                 "optional": True}
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert "LORAFLEET_GATEWAY_API_KEY" not in config_map.get("data", {}), "the API key belongs in the Secret"
    config = GatewayConfig.from_args(_parse(gateway.spec["args"], env, monkeypatch))
    assert config.api_key == env["LORAFLEET_GATEWAY_API_KEY"]  # from secret.example.yaml
    # Clients name the base model as the config map says, not after the mount folder (/models/base).
    config_map = find(objects, "ConfigMap", "lorafleet-config")["data"]
    assert config.model_name == config_map["LORAFLEET_GATEWAY_MODEL_NAME"] != Path(env["LORAFLEET_MODEL"]).name
    # GET /v1/models lists the root the adapter store serves from.
    (store,) = [c for c in lorafleet_containers(objects) if c.subcommand == "adapter-store"]
    assert config.adapters == container_env(store, objects)["LORAFLEET_ADAPTERS"] != ""


def test_gateway_ingress_example_reaches_the_service_and_lets_streams_through():
    from lorafleet.gateway.app import MAX_BODY_BYTES

    objects = rendered("base")
    ingress = gateway_ingress_example()
    service = find(objects, "Service", NAME)
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"]
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert backends
    for backend in backends:
        assert backend["name"] == NAME
        assert backend["port"].get("name") in [p["name"] for p in service["spec"]["ports"]] or \
            backend["port"].get("number") in [p["port"] for p in service["spec"]["ports"]]
    gateway = _gateway(objects)
    timeout_s = float(container_env(gateway, objects).get("LORAFLEET_GATEWAY_REQUEST_TIMEOUT_S",
                                                          settings.ENV_VARS["GATEWAY_REQUEST_TIMEOUT_S"].default))
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off", "SSE must not be buffered"
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= timeout_s
    assert quantity(annotations["nginx.ingress.kubernetes.io/proxy-body-size"].replace("m", "Mi")) >= MAX_BODY_BYTES
