"""The overlays are rendered by the real kustomize (`kubectl kustomize`), not imitated: every object
is complete and namespaced as `kubectl apply -k` would send it, each overlay's patches and image
rewrites land on the fields they name (strategic merge: keyed lists merge, other fields keep the
base's values), a broken kustomization fails with kustomize's own message, and without kubectl the
rendering tests skip with a reason instead of erroring."""

from __future__ import annotations

import textwrap

import pytest

from tests.deploy.manifests import (
    KUBECTL_ENV,
    KUBECTL_MISSING,
    OVERLAYS,
    all_containers,
    find,
    kustomize_build,
    rendered,
)

NAMESPACE = "lorafleet"  # base/kustomization.yaml's `namespace:`
CLUSTER_SCOPED = {"Namespace", "PersistentVolume"}  # the cluster-scoped kinds deploy/k8s holds
IMAGE = "registry.example.com/lorafleet:0.1.0"  # the overlays' `images:` rewrite of `lorafleet`


def _engine(objects: list[dict]) -> dict:
    deployment = find(objects, "Deployment", "lorafleet-engine")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "engine"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_complete_unique_and_namespaced(overlay):
    objects = rendered(overlay)
    assert objects, f"{overlay}: kustomize rendered nothing"
    identities = set()
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        identity = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
        assert identity not in identities, f"{overlay}: {identity} rendered twice"
        identities.add(identity)
        # kustomize's namespace transformer: every namespaced object in the base's namespace; the
        # Namespace object itself renamed to it; cluster-scoped objects left without one.
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"{overlay}: {identity} is cluster-scoped"
        else:
            # An object an overlay adds is only namespaced if that overlay (or one above it) says
            # `namespace:`; without one, `kubectl apply -k` puts it in the context's namespace, away
            # from the workloads it refers to (a ScaledObject's target must be in its namespace).
            assert obj["metadata"].get("namespace") == NAMESPACE, (
                f"{overlay}: {identity} has namespace {obj['metadata'].get('namespace')!r}, not {NAMESPACE!r}")
    assert find(objects, "Namespace", NAMESPACE)


def test_single_gpu_node_binds_the_models_claim_to_its_host_volume():
    base = find(rendered("base"), "PersistentVolumeClaim", "lorafleet-models")["spec"]
    objects = rendered("single-gpu-node")
    claim = find(objects, "PersistentVolumeClaim", "lorafleet-models")["spec"]
    assert base["accessModes"] == ["ReadOnlyMany"] and "volumeName" not in base
    # The patch (overlays/single-gpu-node/models-pvc.yaml) replaced the list and added the binding ...
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["storageClassName"] == ""
    assert claim["volumeName"] == "lorafleet-models-local"
    assert find(objects, "PersistentVolume", claim["volumeName"])
    # ... and merged: the size it does not mention is still the base's.
    assert claim["resources"] == base["resources"]


def test_production_patches_resources_config_and_images():
    base, production = rendered("base"), rendered("production")
    assert _engine(base)["resources"]["limits"]["memory"] == "32Gi"
    assert _engine(production)["resources"]["limits"]["memory"] == "64Gi"
    base_config = find(base, "ConfigMap", "lorafleet-config")["data"]
    config = find(production, "ConfigMap", "lorafleet-config")["data"]
    assert (base_config["LORAFLEET_WORK_PARTITIONS"], config["LORAFLEET_WORK_PARTITIONS"]) == ("8", "32")
    assert base_config.keys() <= config.keys(), "a ConfigMap patch merges into the base's data"
    assert {c.spec["image"] for c in all_containers(base)} == {"lorafleet"}
    assert {c.spec["image"] for c in all_containers(production)} == {IMAGE}
    assert [o["metadata"]["name"] for o in production if o["kind"] == "ScaledObject"]


def test_tensor_parallel_merges_env_and_volumes_by_name():
    production, tp = _engine(rendered("production")), _engine(rendered("tensor-parallel"))
    env = {v["name"]: v for v in tp["env"]}
    assert env["LORAFLEET_TP_SIZE"] == {"name": "LORAFLEET_TP_SIZE", "value": "4"}
    # env has a merge key (name): the base's variables survive next to the patch's.
    assert {v["name"] for v in production["env"]} < env.keys()
    volumes = find(rendered("tensor-parallel"), "Deployment", "lorafleet-engine")["spec"]["template"]["spec"]["volumes"]
    assert {"dshm"} < {v["name"] for v in volumes}
    assert tp["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_a_broken_kustomization_fails_with_kustomizes_message(tmp_path):
    files = {
        "kustomization.yaml": "resources: [web.yaml]\npatches: [{path: patch.yaml}]\n",
        "web.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {a: '1'}\n",
        "patch.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {a: '2'}\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    with pytest.raises(RuntimeError, match=r"kustomize .* failed \(exit \d+\):\n(.|\n)*other"):
        kustomize_build(tmp_path)


def test_without_kubectl_rendering_skips_with_the_reason(monkeypatch):
    # Runs with or without kubectl: the skip must come before the (cached) render.
    monkeypatch.setenv(KUBECTL_ENV, "/nonexistent/kubectl")
    with pytest.raises(pytest.skip.Exception, match=KUBECTL_MISSING):
        rendered("base")
