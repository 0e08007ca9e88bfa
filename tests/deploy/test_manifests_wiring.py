"""How the rendered pieces fit together, for every overlay: probes run the real checks of the
service they guard, grace periods outlast the drains, engines sit on GPU nodes beside an adapter
store that shares their host memory and answers at the address they are given, every container
has requests and limits, disruption budgets cover the workloads, KEDA watches the right group."""

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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_drain(overlay):
    objects = rendered(overlay)
    for container in lorafleet_containers(objects):
        grace = container.pod["terminationGracePeriodSeconds"]
        if container.subcommand in ("ingest", "engine"):
            drain = float(container_env(container, objects)["LORAFLEET_DRAIN_TIMEOUT_S"])
            assert grace >= drain + AFTER_DRAIN_S, f"{container.where}: grace {grace}s < drain {drain}s + {AFTER_DRAIN_S}s"
        else:
            assert grace >= 10, container.where


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
