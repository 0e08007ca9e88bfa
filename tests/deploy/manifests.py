"""The rendered manifests of deploy/k8s, and what each container would see at run time.

`rendered(name)` renders an overlay with the real kustomize built into kubectl (`kubectl kustomize
DIR`), so the tests check exactly the objects `kubectl apply -k` would send. Without kubectl the
tests that render skip (they cannot check anything honest). LORAFLEET_KUBECTL names another
kubectl binary; set it to a path that does not exist to see that skip on a machine that has
kubectl (hiding /usr/bin/kubectl through PATH means dropping /bin too, often a link to /usr/bin).

`lorafleet_containers` walks every container that runs the `lorafleet` command; `container_env`
resolves its environment as the kubelet would (envFrom first, then env, which wins; ConfigMaps
from the rendered objects, Secret keys from deploy/k8s/secret.example.yaml, downward-API fields
as placeholders).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = {
    "base": K8S / "base",
    "single-gpu-node": K8S / "overlays" / "single-gpu-node",
    "production": K8S / "overlays" / "production",
    "tensor-parallel": K8S / "overlays" / "tensor-parallel",
}
SECRET_EXAMPLE = K8S / "secret.example.yaml"
GATEWAY_INGRESS_EXAMPLE = K8S / "gateway-ingress.example.yaml"
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
FIELD_PLACEHOLDERS = {"metadata.name": "lorafleet-engine-7d9c5b6f4-x2x8q", "status.hostIP": "10.0.0.7",
                      "spec.nodeName": "gpu-node-1", "status.podIP": "10.1.2.3"}


@dataclass(frozen=True)
class Container:
    workload: dict  # the Deployment / DaemonSet
    pod: dict  # its pod template's spec
    spec: dict  # the container

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']} container {self.spec['name']}"

    @property
    def subcommand(self) -> str:
        return self.spec["args"][0]


KUBECTL_ENV = "LORAFLEET_KUBECTL"  # kubectl to run instead of the one on PATH (see the docstring)
KUBECTL_MISSING = "kubectl not found: install kubectl to render deploy/k8s with kustomize"
RENDER_TIMEOUT_S = 60  # a local render takes well under a second; never hang the suite on it


def kubectl() -> str | None:
    """The kubectl binary to render with, or None where there is none."""
    return shutil.which(os.environ.get(KUBECTL_ENV) or "kubectl")


def kustomize_build(folder: str | Path) -> list[dict]:
    """The objects `kubectl kustomize folder` prints, in its order; skips the test without kubectl."""
    binary = kubectl()
    if binary is None:
        pytest.skip(KUBECTL_MISSING)
    argv = [binary, "kustomize", str(folder)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {exc.returncode}):\n{exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} did not finish within {RENDER_TIMEOUT_S} s") from None
    # kustomize separates objects with `---`; an empty document (none here) would load as None.
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj is not None]


@lru_cache(maxsize=None)
def _rendered(name: str) -> tuple:
    return tuple(kustomize_build(OVERLAYS[name]))


def rendered(name: str) -> list[dict]:
    """Overlay `name` rendered once per session; a deep copy, so a test may damage its objects."""
    if kubectl() is None:  # checked before the cache: a skip is not a result to remember
        pytest.skip(KUBECTL_MISSING)
    return copy.deepcopy(list(_rendered(name)))


def secret_example() -> dict:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


def gateway_ingress_example() -> dict:
    return yaml.safe_load(GATEWAY_INGRESS_EXAMPLE.read_text())


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selected_workloads(objects: list[dict], selector: dict[str, str]) -> list[dict]:
    """The workloads whose pods a Service's `selector` (or a matchLabels) selects; none for an empty one."""
    return [w for w in workloads(objects) if selector and selector.items() <= pod_labels(w).items()]


def all_containers(objects: list[dict]) -> list[Container]:
    out = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        for spec in pod.get("initContainers", []) + pod["containers"]:
            out.append(Container(workload, pod, spec))
    return out


def lorafleet_containers(objects: list[dict]) -> list[Container]:
    return [c for c in all_containers(objects) if c.spec.get("command") == ["lorafleet"]]


def container_env(container: Container, objects: list[dict], secret: dict | None = None) -> dict[str, str]:
    """The environment the kubelet would give the container (secret values from the example)."""
    secret = secret if secret is not None else secret_example()
    secret_data = {**secret.get("stringData", {})}
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom", []):
        assert "prefix" not in source, f"{container.where}: envFrom prefix is not used by lorafleet"
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        elif "secretRef" in source:
            assert source["secretRef"]["name"] == secret["metadata"]["name"], container.where
            env.update(secret_data)
    for var in container.spec.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = _expand(str(var["value"]), env)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[name] = FIELD_PLACEHOLDERS[ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            data = find(objects, "ConfigMap", ref["configMapKeyRef"]["name"]).get("data", {})
            if ref["configMapKeyRef"]["key"] in data:
                env[name] = data[ref["configMapKeyRef"]["key"]]
            else:
                assert ref["configMapKeyRef"].get("optional"), f"{container.where}: {name} refers to a missing key"
        elif "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            assert key_ref["name"] == secret["metadata"]["name"], f"{container.where}: {name} names secret {key_ref['name']}"
            if key_ref["key"] in secret_data:
                env[name] = secret_data[key_ref["key"]]
            else:
                assert key_ref.get("optional"), f"{container.where}: {name} refers to secret key {key_ref['key']} missing from the example"
        else:
            raise AssertionError(f"{container.where}: unsupported valueFrom {ref}")
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a value from variables defined before it."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes resource quantity ('12Gi', '500m', '2', 4) as a number (bytes or cores)."""
    text = str(value)
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match and (match.group(2) in _UNITS or not match.group(2)), f"not a quantity: {value!r}"
    return float(match.group(1)) * _UNITS.get(match.group(2), 1)


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def probes(container: Container) -> dict[str, dict]:
    return {kind: container.spec[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container.spec}
