"""How the rendered pieces fit together, for every overlay: probes run the real checks of the
service they guard, grace periods outlast the preStop hooks and the drains, engines sit on GPU
nodes beside an adapter store that shares their host memory and answers at the address they are
given, every Service selects the pods of one workload and its target ports exist on them, every
container has requests and limits, disruption budgets cover the workloads without blocking
evictions, each autoscaler (HorizontalPodAutoscaler or KEDA) targets an existing workload that no
other autoscaler targets, KEDA watches the right group."""

from __future__ import annotations

import pytest

from lorafleet.adapter_store.config import parse_address
from lorafleet.health import CHECK_TIMEOUT_S
from tests.deploy.manifests import (
    OVERLAYS,
    all_containers,
    container_env,
    find,
    flag_value,
    lorafleet_containers,
    probes,
    quantity,
    rendered,
    selected_workloads,
)

# After the drain: the consumer leaves its group (<= 10 s, services' finally blocks), ingest also
# flushes its producer (<= 10 s); the rest is process exit.
AFTER_DRAIN_S = 20
# A probe runs `lorafleet ... --check`: Python + torch import (a few s), then checks of CHECK_TIMEOUT_S.
PROBE_TIMEOUT_MIN_S = 15


def _by_subcommand(objects) -> dict:
    out = {}
    for container in lorafleet_containers(objects):
        assert container.subcommand not in out, f"two containers run lorafleet {container.subcommand}"
        out[container.subcommand] = container
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_run_the_services_own_checks(overlay):
    for container in lorafleet_containers(rendered(overlay)):
        ready_file = flag_value(container.spec["args"], "--ready-file")
        assert ready_file, f"{container.where}: the service must write a ready file for its probes"
        mounts = [m for m in container.spec["volumeMounts"] if ready_file.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts and not mounts[0].get("readOnly"), f"{container.where}: {ready_file} is not on a writable volume"
        found = probes(container)
        assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}, container.where
        expected = {"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "live"}
        for kind, probe in found.items():
            command = probe["exec"]["command"]
            assert command[:2] == ["lorafleet", container.subcommand], f"{container.where} {kind}"
            assert flag_value(command, "--check") == expected[kind], f"{container.where} {kind}"
            assert flag_value(command, "--ready-file") == ready_file, f"{container.where} {kind}: another ready file"
            assert probe["timeoutSeconds"] >= max(PROBE_TIMEOUT_MIN_S, CHECK_TIMEOUT_S + 5), f"{container.where} {kind}"


# The services that drain for LORAFLEET_DRAIN_TIMEOUT_S on SIGTERM (the store only closes its server).
DRAINING = ("ingest", "engine", "gateway")


def _pre_stop_s(container) -> float:
    """Seconds the container's preStop hook takes (the grace period counts them before SIGTERM)."""
    hook = container.spec.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"{container.where}: a preStop hook this test cannot time"
    return float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_drain(overlay):
    objects = rendered(overlay)
    for container in lorafleet_containers(objects):
        grace = container.pod["terminationGracePeriodSeconds"]
        pre_stop = _pre_stop_s(container)
        if container.subcommand in DRAINING:
            drain = float(container_env(container, objects)["LORAFLEET_DRAIN_TIMEOUT_S"])
            assert grace >= pre_stop + drain + AFTER_DRAIN_S, (
                f"{container.where}: grace {grace}s < preStop {pre_stop}s + drain {drain}s + {AFTER_DRAIN_S}s")
        else:
            assert grace >= pre_stop + 10, container.where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_on_gpu_nodes_beside_their_adapter_store(overlay):
    objects = rendered(overlay)
    services = _by_subcommand(objects)
    engine, store = services["engine"], services["adapter-store"]
    assert engine.workload["kind"] == "Deployment" and store.workload["kind"] == "DaemonSet"
    limits = engine.spec["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1, "engines must ask for a GPU"
    assert engine.pod["nodeSelector"], "engines must be placed on GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in engine.pod["tolerations"])
    # The store runs wherever an engine may run: same node selector and tolerations.
    assert store.pod["nodeSelector"] == engine.pod["nodeSelector"]
    assert store.pod["tolerations"] == engine.pod["tolerations"]
    assert "nvidia.com/gpu" not in store.spec["resources"].get("limits", {}), "the store must not take a GPU"


def _host_mount(container, mount_path: str) -> tuple[str, bool]:
    mount = next(m for m in container.spec["volumeMounts"] if m["mountPath"] == mount_path)
    volume = next(v for v in container.pod["volumes"] if v["name"] == mount["name"])
    assert "hostPath" in volume, f"{container.where}: {mount_path} must be the node's host folder"
    return volume["hostPath"]["path"], bool(mount.get("readOnly"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_store_and_engines_share_host_memory_at_the_same_path(overlay):
    objects = rendered(overlay)
    services = _by_subcommand(objects)
    engine, store = services["engine"], services["adapter-store"]
    shm_dir = container_env(store, objects)["LORAFLEET_STORE_SHM_DIR"]
    store_host, store_read_only = _host_mount(store, shm_dir)
    engine_host, engine_read_only = _host_mount(engine, shm_dir)  # the store hands out paths under shm_dir
    assert store_host == engine_host and store_host.startswith("/dev/shm/"), "one tmpfs folder per node"
    assert not store_read_only and engine_read_only


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_reach_their_nodes_store(overlay):
    objects = rendered(overlay)
    services = _by_subcommand(objects)
    engine, store = services["engine"], services["adapter-store"]
    host, port = parse_address(container_env(engine, objects)["LORAFLEET_STORE_ADDRESS"])
    service = find(objects, "Service", host)
    assert service["spec"]["internalTrafficPolicy"] == "Local", "engines must only reach their own node's store"
    labels = store.workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service must select the store pods"
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == port)
    container_port = next(p for p in store.spec["ports"] if service_port["targetPort"] in (p["name"], p["containerPort"]))
    listen_host, listen_port = parse_address(container_env(store, objects)["LORAFLEET_STORE_ADDRESS"])
    assert listen_port == container_port["containerPort"] and listen_host in ("0.0.0.0", "::")


def service_problems(service: dict, objects: list[dict]) -> list[str]:
    """Why `service` does not reach pods: its selector must select the pods of exactly one workload
    (a broader one would mix services behind one address), and each of its ports' targetPort (a
    name or a number; absent: the port) must be a port of that workload's containers, same protocol."""
    where = f"Service/{service['metadata']['name']}"
    selector = service["spec"].get("selector") or {}
    if not selector:
        return [f"{where}: no selector (its endpoints would have to be managed by hand)"]
    chosen = selected_workloads(objects, selector)
    if len(chosen) != 1:
        names = [f"{w['kind']}/{w['metadata']['name']}" for w in chosen]
        return [f"{where}: selector {selector} selects the pods of {names or 'no workload'}, not of one"]
    (workload,) = chosen
    pod = workload["spec"]["template"]["spec"]
    container_ports = [p for c in pod["containers"] for p in c.get("ports", [])]
    found = []
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        protocol = port.get("protocol", "TCP")
        key = "name" if isinstance(target, str) else "containerPort"
        if not any(p.get(key) == target and p.get("protocol", "TCP") == protocol for p in container_ports):
            found.append(f"{where} port {port.get('name', port['port'])}: targetPort {target!r} ({protocol}) is not "
                         f"a port of {workload['kind']}/{workload['metadata']['name']}'s containers")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_one_workload_and_targets_its_ports(overlay):
    objects = rendered(overlay)
    services = [o for o in objects if o["kind"] == "Service"]
    assert services, overlay
    for service in services:
        assert service_problems(service, objects) == []


def test_service_check_catches_a_wrong_selector_and_port():
    objects = rendered("base")
    service = find(objects, "Service", "lorafleet-gateway")
    assert service_problems(service, objects) == []
    service["spec"]["ports"][0]["targetPort"] = "htpp"
    assert "targetPort 'htpp'" in service_problems(service, objects)[0]
    service["spec"]["ports"][0]["targetPort"] = 8000  # the same port by number
    assert service_problems(service, objects) == []
    service["spec"]["ports"][0]["protocol"] = "UDP"
    assert service_problems(service, objects)
    service["spec"]["selector"] = {"app.kubernetes.io/part-of": "lorafleet"}  # every lorafleet pod
    assert "not of one" in service_problems(service, objects)[0]
    service["spec"]["selector"] = {"app.kubernetes.io/component": "gateways"}
    assert "no workload" in service_problems(service, objects)[0]


def _autoscalers(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, target reference, the autoscaler) of every HorizontalPodAutoscaler and ScaledObject."""
    out = []
    for obj in objects:
        if obj["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            out.append((f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["scaleTargetRef"], obj))
    return out


def _min_replicas(workload: dict, objects: list[dict]) -> int:
    """The fewest pods `workload` runs: its autoscaler's minimum, else its replicas (default 1)."""
    for _where, ref, scaler in _autoscalers(objects):
        if ref["name"] == workload["metadata"]["name"] and ref.get("kind", "Deployment") == workload["kind"]:
            return scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount", 1))
    return workload["spec"].get("replicas", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_autoscaler_targets_one_existing_workload_alone(overlay):
    objects = rendered(overlay)
    targets = {}
    for where, ref, scaler in _autoscalers(objects):
        kind = ref.get("kind", "Deployment")  # KEDA's default
        assert ref.get("apiVersion", "apps/v1") == "apps/v1", f"{where}: {ref}"
        assert kind in ("Deployment", "StatefulSet"), f"{where}: {ref}"
        target = find(objects, kind, ref["name"])
        assert target["metadata"].get("namespace") == scaler["metadata"].get("namespace"), where
        # Two autoscalers of one workload (KEDA makes an HPA of its own) would fight over replicas.
        assert (kind, ref["name"]) not in targets, f"{where} and {targets.get((kind, ref['name']))} scale one workload"
        targets[(kind, ref["name"])] = where
        assert "replicas" not in target["spec"], f"{where}: {kind}/{ref['name']} pins replicas: apply would fight it"
        if scaler["kind"] != "HorizontalPodAutoscaler":
            continue
        spec = scaler["spec"]
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"], where
        for metric in spec["metrics"]:
            if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
                # utilization is usage / request: every container must request the resource
                resource = metric["resource"]["name"]
                for container in target["spec"]["template"]["spec"]["containers"]:
                    assert resource in container["resources"].get("requests", {}), (
                        f"{where}: container {container['name']} has no {resource} request to measure against")
                assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    objects = rendered(overlay)
    for container in all_containers(objects):
        resources = container.spec["resources"]
        for kind in ("cpu", "memory"):
            request, limit = resources["requests"][kind], resources["limits"][kind]
            assert quantity(request) <= quantity(limit), f"{container.where}: {kind} request > limit"
    store = _by_subcommand(objects)["adapter-store"]
    env = container_env(store, objects)
    # Adapter files on tmpfs are charged to the store's memory cgroup: the budget, one adapter
    # being validated and the process itself must fit under its limit.
    need = int(env["LORAFLEET_STORE_MEMORY_BYTES"]) + int(env["LORAFLEET_STORE_MAX_ADAPTER_BYTES"]) + (1 << 30)
    assert quantity(store.spec["resources"]["limits"]["memory"]) >= need


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_and_claims_exist(overlay):
    objects = rendered(overlay)
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for container in all_containers(objects):
        volumes = {v["name"]: v for v in container.pod["volumes"]}
        for mount in container.spec.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container.where}: no volume {mount['name']}"
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim is None or claim["claimName"] in claims, f"{container.where}: no claim {claim}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_the_deployments(overlay):
    objects = rendered(overlay)
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"Deployment/{deployment['metadata']['name']} needs one disruption budget"
    for budget in budgets:
        (workload,) = selected_workloads(objects, budget["spec"]["selector"]["matchLabels"])
        # A budget that keeps every pod blocks node drains for good: leave at least one evictable.
        if isinstance(budget["spec"].get("minAvailable"), int):
            assert budget["spec"]["minAvailable"] < _min_replicas(workload, objects), budget["metadata"]["name"]
        elif "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] != "100%", budget["metadata"]["name"]
        else:
            assert budget["spec"]["maxUnavailable"] >= 1, budget["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["single-gpu-node", "production"])
def test_overlays_pin_one_image_for_every_container(overlay):
    images = {c.spec["image"] for c in all_containers(rendered(overlay))}
    assert len(images) == 1 and images != {"lorafleet"}, images


def test_keda_watches_the_groups_the_services_consume():
    objects = rendered("production")
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    topic_vars = {"engine": ("LORAFLEET_WORK_TOPIC", "LORAFLEET_ENGINE_GROUP", "LORAFLEET_WORK_PARTITIONS"),
                  "ingest": ("LORAFLEET_REQUESTS_TOPIC", "LORAFLEET_INGEST_GROUP", "LORAFLEET_REQUESTS_PARTITIONS")}
    assert len(scaled) == 2
    for obj in scaled:
        target = find(objects, obj["spec"]["scaleTargetRef"].get("kind", "Deployment"), obj["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "an autoscaled Deployment must not pin replicas (apply would fight KEDA)"
        container = next(c for c in lorafleet_containers(objects) if c.workload is target or c.workload == target)
        env = container_env(container, objects)
        topic, group, partitions = topic_vars[container.subcommand]
        (trigger,) = obj["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["bootstrapServers"] == env["LORAFLEET_KAFKA_BOOTSTRAP"]
        assert (meta["topic"], meta["consumerGroup"]) == (env[topic], env[group])
        assert meta["offsetResetPolicy"] == "earliest"  # as our consumers (services/common/kafka.make_consumer)
        assert 1 <= obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"] <= int(env[partitions])
