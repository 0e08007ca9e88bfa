"""The small kustomize (tests/deploy/kustomize_subset.py): its rules one by one, its refusals, and,
where a real kustomize is installed (`kubectl kustomize`), the same output for every overlay."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import pytest
import yaml

from tests.deploy.kustomize_subset import Unsupported, render, split_image, strategic_merge
from tests.deploy.manifests import OVERLAYS


def _write(folder, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


DEPLOYMENT = """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      template:
        spec:
          containers:
            - name: app
              image: example/app:1.0
              args: ["serve", "--fast"]
              env: [{name: A, value: "1"}, {name: B, value: "2"}]
              ports: [{containerPort: 80, name: http}]
          volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
    """


def test_maps_merge_nulls_delete_keyed_lists_merge_other_lists_replace():
    base = yaml.safe_load(textwrap.dedent(DEPLOYMENT))
    patch = {"spec": {"template": {"spec": {
        "containers": [{"name": "app", "args": ["serve"], "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                        "ports": [{"containerPort": 80, "name": "web"}]},
                       {"name": "sidecar", "image": "example/side"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": None, "emptyDir": {}}]}}}}
    out = strategic_merge(base, patch)
    app, sidecar = out["spec"]["template"]["spec"]["containers"]
    assert app["args"] == ["serve"]  # no merge key: replaced
    # Patch items first, in patch order, then the base's others (kustomize's order).
    assert app["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}, {"name": "A", "value": "1"}]
    assert app["ports"] == [{"containerPort": 80, "name": "web"}] and app["image"] == "example/app:1.0"
    assert sidecar == {"name": "sidecar", "image": "example/side"}
    assert out["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert base["spec"]["template"]["spec"]["containers"][0]["args"] == ["serve", "--fast"], "base must not change"


def test_patch_directives_are_refused():
    with pytest.raises(Unsupported):
        strategic_merge({"a": [1]}, {"$patch": "replace", "a": [2]})


@pytest.mark.parametrize("image, parts", [
    ("app", ("app", None, None)),
    ("app:1.0", ("app", "1.0", None)),
    ("registry:5000/team/app", ("registry:5000/team/app", None, None)),
    ("registry:5000/team/app:2@sha256:ab", ("registry:5000/team/app", "2", "sha256:ab")),
])
def test_split_image(image, parts):
    assert split_image(image) == parts


def test_overlay_over_base_with_namespace_patches_and_images(tmp_path):
    _write(tmp_path, {
        "base/kustomization.yaml": "namespace: shop\nresources: [web.yaml, ns.yaml]\n",
        "base/web.yaml": DEPLOYMENT,
        "base/ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: anything}\n",
        "prod/kustomization.yaml": """\
            resources: [../base, pv.yaml]
            patches: [{path: web.yaml}]
            images: [{name: example/app, newName: reg.example/app, newTag: "2.0"}]
            """,
        "prod/pv.yaml": "apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: data}\nspec: {capacity: {storage: 1Gi}}\n",
        "prod/web.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 3}\n",
    })
    objects = {o["kind"]: o for o in render(tmp_path / "prod")}
    assert objects["Namespace"]["metadata"]["name"] == "shop"
    assert objects["Deployment"]["metadata"]["namespace"] == "shop" and objects["Deployment"]["spec"]["replicas"] == 3
    assert objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/app:2.0"
    assert "namespace" not in objects["PersistentVolume"]["metadata"]  # cluster-scoped, and outside the base


def test_unsupported_fields_and_unmatched_patches_are_errors(tmp_path):
    _write(tmp_path, {"a/kustomization.yaml": "resources: [web.yaml]\ncommonLabels: {x: y}\n", "a/web.yaml": DEPLOYMENT,
                      "b/kustomization.yaml": "resources: [web.yaml]\npatches: [{path: p.yaml}]\n", "b/web.yaml": DEPLOYMENT,
                      "b/p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\nspec: {replicas: 1}\n"})
    with pytest.raises(Unsupported, match="commonLabels"):
        render(tmp_path / "a")
    with pytest.raises(ValueError, match="matches 0 resources"):
        render(tmp_path / "b")


def _identity(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def _kubectl_render(folder) -> dict | None:
    """{identity: object} as `kubectl kustomize` renders `folder`; None without a kustomize."""
    if shutil.which("kubectl") is None:
        return None
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "unknown command" in result.stderr:
        return None
    assert result.returncode == 0, result.stderr
    return {_identity(o): o for o in yaml.safe_load_all(result.stdout) if o}


def _assert_same_as_kubectl(folder) -> None:
    theirs = _kubectl_render(folder)
    if theirs is None:
        pytest.skip("no kubectl with a built-in kustomize on this machine")
    ours = {_identity(o): o for o in render(folder)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_same_objects_as_kubectl_kustomize(overlay):
    _assert_same_as_kubectl(OVERLAYS[overlay])


def test_same_merge_order_as_kubectl_kustomize(tmp_path):
    _write(tmp_path, {
        "kustomization.yaml": "resources: [web.yaml]\npatches: [{path: p.yaml}]\nnamespace: shop\n"
                              "images: [{name: example/app, digest: 'sha256:0123'}]\n",
        "web.yaml": DEPLOYMENT,
        "p.yaml": """\
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: web}
            spec:
              template:
                spec:
                  containers:
                    - name: sidecar
                      image: example/side:3
                    - name: app
                      env: [{name: C, value: "x"}, {name: A, value: null}, {name: B, value: "y"}]
                  volumes: [{name: data, persistentVolumeClaim: null, emptyDir: {}}]
            """,
    })
    _assert_same_as_kubectl(tmp_path)
