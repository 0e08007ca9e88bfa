"""Every workload of every overlay owns exactly its own pods, and every named port reference points
at a port that exists: a Deployment's, StatefulSet's or DaemonSet's spec.selector (matchLabels and
matchExpressions) selects its own pod template's labels (the API server refuses a workload whose
selector does not, yet kustomize renders it all the same) and no other workload's pods (two
controllers would fight over them); a topology spread counts the workload's own pods; every port a
probe or lifecycle hook names is a port of its container, every port a PodMonitor scrapes a port of
each pod it selects. Each check is shown to catch its mistake on rendered objects damaged in memory."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, find, pod_labels, rendered, workloads

SELECTING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")  # spec.selector owns the pods (a Job's is generated)
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: every matchLabels pair and every matchExpressions term holds."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for term in selector.get("matchExpressions") or []:
        key, operator, values = term["key"], term["operator"], term.get("values") or []
        holds = {"In": key in labels and labels[key] in values,
                 "NotIn": key not in labels or labels[key] not in values,
                 "Exists": key in labels,
                 "DoesNotExist": key not in labels}[operator]
        if not holds:
            return False
    return True


def _where(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def workload_selector_problems(workload: dict, objects: list[dict]) -> list[str]:
    """Why `workload`'s spec.selector does not own exactly its own pods (empty when it does)."""
    selector = workload["spec"].get("selector") or {}
    if not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return [f"{_where(workload)}: no spec.selector (apps/v1 requires one)"]
    labels = pod_labels(workload)
    found = []
    if not selector_matches(selector, labels):
        found.append(f"{_where(workload)}: selector {selector} does not match its pod template's labels {labels}")
    for other in workloads(objects):
        if other is not workload and selector_matches(selector, pod_labels(other)):
            found.append(f"{_where(workload)}: selector {selector} also selects the pods of {_where(other)}")
    return found


def spread_problems(workload: dict) -> list[str]:
    """A topology spread constraint whose labelSelector misses the workload's own pods spreads nothing."""
    pod = workload["spec"]["template"]["spec"]
    labels = pod_labels(workload)
    return [f"{_where(workload)}: topology spread selector {c['labelSelector']} misses its own pods {labels}"
            for c in pod.get("topologySpreadConstraints", []) if not selector_matches(c["labelSelector"], labels)]


def _named_ports(handler: dict) -> list[str]:
    """The port names a probe or lifecycle handler refers to (numbers need no lookup)."""
    return [h["port"] for kind in ("httpGet", "tcpSocket", "grpc")
            if (h := handler.get(kind)) is not None and isinstance(h.get("port"), str)]


def probe_port_problems(workload: dict) -> list[str]:
    """Every port name a container's probes or lifecycle hooks use is one of that container's ports."""
    pod = workload["spec"]["template"]["spec"]
    found = []
    for container in pod.get("initContainers", []) + pod["containers"]:
        names = {p["name"] for p in container.get("ports", []) if "name" in p}
        handlers = {kind: container[kind] for kind in PROBES if kind in container}
        handlers.update({f"lifecycle.{k}": v for k, v in container.get("lifecycle", {}).items()})
        for kind, handler in handlers.items():
            found += [f"{_where(workload)} container {container['name']} {kind}: port {name!r} is not one of its "
                      f"ports {sorted(names)}" for name in _named_ports(handler) if name not in names]
    return found


def pod_monitor_problems(monitor: dict, objects: list[dict]) -> list[str]:
    """A PodMonitor selects some workload's pods, and every port it scrapes is a port of each of them."""
    selected = [w for w in workloads(objects) if selector_matches(monitor["spec"]["selector"], pod_labels(w))]
    if not selected:
        return [f"{_where(monitor)}: selector {monitor['spec']['selector']} selects no workload's pods"]
    found = []
    for workload in selected:
        names = {p.get("name") for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        found += [f"{_where(monitor)}: port {e['port']!r} is not a port of {_where(workload)}'s pods"
                  for e in monitor["spec"]["podMetricsEndpoints"] if "port" in e and e["port"] not in names]
    return found


def problems(objects: list[dict]) -> list[str]:
    found = []
    for workload in workloads(objects):
        if workload["kind"] in SELECTING_KINDS:
            found += workload_selector_problems(workload, objects)
        found += spread_problems(workload) + probe_port_problems(workload)
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        found += pod_monitor_problems(monitor, objects)
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_owns_its_pods_and_named_ports_exist(overlay):
    objects = rendered(overlay)
    assert sum(o["kind"] in SELECTING_KINDS for o in objects) >= 4, "every service's workload is rendered"
    found = problems(objects)
    assert not found, "\n".join(found)


def test_selector_check_catches_a_workload_that_does_not_own_its_pods():
    objects = rendered("base")
    engine = find(objects, "Deployment", "lorafleet-engine")
    engine["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "engines"
    assert "does not match its pod template's labels" in " ".join(problems(objects))
    engine["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "engine"
    assert problems(objects) == []
    engine["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "worker"  # the other side
    assert "does not match its pod template's labels" in " ".join(problems(objects))
    engine["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "engine"
    engine["spec"]["selector"]["matchExpressions"] = [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["engine", "engine-tp"]}]
    assert problems(objects) == []
    engine["spec"]["selector"]["matchExpressions"][0]["operator"] = "NotIn"
    assert "does not match its pod template's labels" in " ".join(problems(objects))
    engine["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "lorafleet"}}  # every lorafleet pod
    assert "also selects the pods of Deployment/lorafleet-ingest" in " ".join(problems(objects))
    del engine["spec"]["selector"]
    assert "no spec.selector" in " ".join(problems(objects))
    store = find(objects, "DaemonSet", "lorafleet-adapter-store")
    assert workload_selector_problems(store, objects) == []
    store["spec"]["selector"]["matchExpressions"] = [{"key": "app.kubernetes.io/component", "operator": "DoesNotExist"}]
    assert workload_selector_problems(store, objects)


def test_spread_and_named_port_checks_catch_their_mistakes():
    objects = rendered("production")
    assert problems(objects) == []
    gateway = find(objects, "Deployment", "lorafleet-gateway")
    (spread,) = gateway["spec"]["template"]["spec"]["topologySpreadConstraints"]
    spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] = "ingest"
    assert "misses its own pods" in " ".join(problems(objects))
    spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] = "gateway"
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "metrcs"}}
    assert "readinessProbe: port 'metrcs' is not one of its ports" in " ".join(problems(objects))
    container["readinessProbe"]["httpGet"]["port"] = "metrics"
    assert problems(objects) == []
    container["livenessProbe"] = {"tcpSocket": {"port": "health"}}
    assert "livenessProbe: port 'health'" in " ".join(problems(objects))
    container["livenessProbe"] = {"tcpSocket": {"port": 9400}}  # a number needs no name
    assert problems(objects) == []
    monitor = find(objects, "PodMonitor", "lorafleet")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "metric"
    assert "port 'metric' is not a port of" in " ".join(problems(objects))
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "metrics"
    monitor["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/part-of": "lorafleets"}}
    assert "selects no workload's pods" in " ".join(problems(objects))
