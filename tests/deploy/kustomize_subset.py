"""A small kustomize for exactly the features deploy/k8s uses, so the manifests can be rendered
and checked where no kustomize binary exists (none is on PyPI, Debian or npm for this machine;
`kubectl kustomize` is used instead when present, and test_kustomize_subset.py checks that both
render every overlay to the same objects).

Kustomization fields understood; any other field, or a patch directive, raises Unsupported, so a
manifest can never rely on a feature this renderer would silently skip:

    apiVersion, kind  kustomize.config.k8s.io/v1beta1, Kustomization
    resources         YAML files (several documents each) and folders holding a kustomization.yaml
                      (rendered first, completely, as kustomize does with bases)
    patches           {path: FILE} or {patch: INLINE}: strategic-merge patches without `target`;
                      each patch document picks its resource by API group, kind and metadata.name
    namespace         set on every namespaced resource; a Namespace resource is renamed to it
    images            {name, newName, newTag, digest}: rewrites containers' and initContainers' image

Applied in kustomize's order: resources, patches, namespace, images.

Strategic merge, as Kubernetes defines it for the fields used here: maps merge key by key, a
null value deletes the key, lists with a patch merge key (MERGE_KEYS, from the API types) merge
item by item, every other list is replaced whole. A merged list holds the patch's items first, in
patch order (each merged into its base item, if any), then the base's other items in base order:
the order kustomize (kyaml) gives.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
# patchMergeKey of the Kubernetes API types, for the list fields a patch may hold.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "PriorityClass", "ClusterRole",
                  "CustomResourceDefinition", "IngressClass", "RuntimeClass"}
# Kinds whose bodies kustomize's namespace transformer also rewrites: not supported here.
NAMESPACE_REFERENCING = {"RoleBinding", "ClusterRoleBinding", "ValidatingWebhookConfiguration",
                         "MutatingWebhookConfiguration", "APIService"}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


def render(folder: str | Path) -> list[dict]:
    """The objects `kustomize build folder` would print (in file order, not kustomize's sort)."""
    folder = Path(folder)
    kustomization = _load_kustomization(folder)
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += _load_documents(path)
        else:
            raise FileNotFoundError(f"{folder}: resource {entry!r} does not exist")
    for patch in kustomization.get("patches", []):
        for document in _patch_documents(folder, patch):
            _apply_patch(objects, document, where=f"{folder}: patch {patch}")
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _load_kustomization(folder: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            data = yaml.safe_load((folder / name).read_text()) or {}
            break
    else:
        raise FileNotFoundError(f"{folder} holds no kustomization.yaml")
    unknown = set(data) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{folder}: kustomization fields {sorted(unknown)} are not supported")
    if data.get("kind", "Kustomization") != "Kustomization":
        raise Unsupported(f"{folder}: kind {data['kind']!r} (only Kustomization)")
    return data


def _load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _patch_documents(folder: Path, patch: dict) -> list[dict]:
    if set(patch) - {"path", "patch"} or len(patch) != 1:
        raise Unsupported(f"{folder}: patch {patch} (only one of path / patch, no target or options)")
    if "path" in patch:
        return _load_documents(folder / patch["path"])
    return [doc for doc in yaml.safe_load_all(patch["patch"]) if doc is not None]


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _apply_patch(objects: list[dict], patch: dict, where: str) -> None:
    meta = patch.get("metadata", {})
    matches = [o for o in objects
               if o["kind"] == patch.get("kind") and o["metadata"]["name"] == meta.get("name")
               and _group(o["apiVersion"]) == _group(patch.get("apiVersion", ""))
               and meta.get("namespace") in (None, o["metadata"].get("namespace"))]
    if len(matches) != 1:
        raise ValueError(f"{where}: {patch.get('kind')}/{meta.get('name')} matches {len(matches)} resources, not 1")
    index = objects.index(matches[0])
    objects[index] = strategic_merge(matches[0], patch)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """`patch` applied to `base` (neither is modified); see the module doc for the rules."""
    if isinstance(patch, dict):
        directives = [k for k in patch if k.startswith("$")]
        if directives:
            raise Unsupported(f"patch directives {directives} are not supported")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _without_nulls(value)
        return out
    if isinstance(patch, list):
        key = _merge_key(field, patch)
        if key is None or not isinstance(base, list):
            return _without_nulls(patch)
        merged, used = [], set()
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise ValueError(f"list {field!r}: every patch item needs its merge key {key!r}: {item!r}")
            same = [i for i, old in enumerate(base) if isinstance(old, dict) and old.get(key) == item[key]]
            if same:
                used.add(same[0])
                merged.append(strategic_merge(base[same[0]], item, field))
            else:
                merged.append(_without_nulls(item))
        return merged + [copy.deepcopy(old) for i, old in enumerate(base) if i not in used]
    return patch


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":  # container ports merge on containerPort, a Service's on port
        return "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        kind = obj["kind"]
        if kind in NAMESPACE_REFERENCING:
            raise Unsupported(f"kind {kind} with `namespace:` (kustomize rewrites references inside it)")
        if kind == "Namespace":
            obj["metadata"]["name"] = namespace
        elif kind not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/a/b:tag@sha256:x' -> ('reg:5000/a/b', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    tag = None
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:  # a colon after the last slash separates the tag (not a port)
        name, tag = head, tail
    return name, tag, digest or None


def _set_image(objects: list[dict], rule: dict) -> None:
    if set(rule) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"images entry {rule} (only name, newName, newTag, digest)")
    for container in _containers(objects):
        name, tag, digest = split_image(container.get("image", ""))
        if name != rule["name"]:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            container["image"] = f"{name}@{rule['digest']}"
        elif "newTag" in rule:
            container["image"] = f"{name}:{rule['newTag']}"
        else:
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _containers(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


if __name__ == "__main__":  # python tests/deploy/kustomize_subset.py deploy/k8s/overlays/production
    yaml.safe_dump_all(render(sys.argv[1]), sys.stdout, sort_keys=False)
