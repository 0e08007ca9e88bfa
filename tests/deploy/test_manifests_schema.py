"""Every rendered manifest, and the example Secret and Ingress, validates strictly (unknown fields
are errors) against the Kubernetes API schemas, offline (kubernetes-validate ships them), for the
oldest and newest Kubernetes versions we claim. KEDA's ScaledObject and the Prometheus Operator's
PodMonitor are custom resources the core schemas do not know: they are validated against
tests/deploy/schemas/keda-scaledobject.schema.json and prometheus-podmonitor.schema.json, written
from their projects' documented fields.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import OVERLAYS, find, gateway_ingress_example, rendered, secret_example

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # internalTrafficPolicy is GA since 1.26
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor")}
KEDA_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "keda-scaledobject.schema.json").read_text())
PODMONITOR_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "prometheus-podmonitor.schema.json").read_text())


def _core(objects):
    return [o for o in objects if (o["apiVersion"], o["kind"]) not in CUSTOM_KINDS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(overlay, version):
    objects = _core(rendered(overlay))
    assert {o["kind"] for o in objects} >= {"Namespace", "ConfigMap", "Deployment", "DaemonSet", "Service",
                                            "PodDisruptionBudget", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_secret_example_validates_strictly(version):
    kubernetes_validate.validate(secret_example(), version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_gateway_ingress_example_validates_strictly(version):
    kubernetes_validate.validate(gateway_ingress_example(), version, strict=True)


@pytest.mark.parametrize("damage", [
    # autoscaling/v1's field, unknown to autoscaling/v2
    lambda o: o["spec"].__setitem__("targetCPUUtilizationPercentage", 70),
    lambda o: o["spec"]["behavior"]["scaleDown"].__setitem__("stabilizationWindow", 300),
    lambda o: o["spec"]["metrics"][0]["resource"]["target"].__setitem__("averageUtilization", "70%"),
])
def test_strict_validation_rejects_a_broken_autoscaler(damage):
    hpa = find(rendered("base"), "HorizontalPodAutoscaler", "lorafleet-gateway")
    kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)
    damage(hpa)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)


def test_strict_validation_rejects_an_unknown_field():
    """The check above can fail: a misspelt field in a pod spec is refused."""
    engine = next(o for o in rendered("base") if o["kind"] == "Deployment" and o["metadata"]["name"] == "lorafleet-engine")
    engine["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(engine, KUBERNETES_VERSIONS[-1], strict=True)


def test_production_scaled_objects_validate_against_the_keda_schema():
    scaled = [o for o in rendered("production") if o["kind"] == "ScaledObject"]
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled} == {"lorafleet-engine", "lorafleet-ingest"}
    for obj in scaled:
        jsonschema.validate(obj, KEDA_SCHEMA, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("breakage", [
    ("a non-string trigger value", lambda o: o["spec"]["triggers"][0]["metadata"].__setitem__("lagThreshold", 128)),
    ("an unknown spec field", lambda o: o["spec"].__setitem__("maxReplicas", 4)),
    ("no target name", lambda o: o["spec"]["scaleTargetRef"].pop("name")),
    ("an unknown kafka key", lambda o: o["spec"]["triggers"][0]["metadata"].__setitem__("consumerGroupId", "x")),
    ("a bad offset policy", lambda o: o["spec"]["triggers"][0]["metadata"].__setitem__("offsetResetPolicy", "first")),
])
def test_keda_schema_rejects_broken_scaled_objects(breakage):
    _what, damage = breakage
    obj = copy.deepcopy(next(o for o in rendered("production") if o["kind"] == "ScaledObject"))
    damage(obj)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, KEDA_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_production_pod_monitor_scrapes_every_lorafleet_pod_and_validates():
    objects = rendered("production")
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    jsonschema.validate(monitor, PODMONITOR_SCHEMA, cls=jsonschema.Draft202012Validator)
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            pod = obj["spec"]["template"]
            assert selector.items() <= pod["metadata"]["labels"].items(), obj["metadata"]["name"]
            ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            assert endpoint["port"] in ports, obj["metadata"]["name"]


@pytest.mark.parametrize("damage", [
    lambda o: o["spec"].__setitem__("endpoints", []),  # a ServiceMonitor's field
    lambda o: o["spec"]["podMetricsEndpoints"][0].__setitem__("interval", "15 seconds"),
    lambda o: o["spec"].pop("selector"),
])
def test_pod_monitor_schema_rejects_broken_monitors(damage):
    obj = copy.deepcopy(next(o for o in rendered("production") if o["kind"] == "PodMonitor"))
    damage(obj)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, PODMONITOR_SCHEMA, cls=jsonschema.Draft202012Validator)
