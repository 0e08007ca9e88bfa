"""The Dockerfile, checked without a Docker engine (none runs here): what it copies exists and is not
dockerignored, what `pip install .` needs is copied, the base image's Python satisfies
requires-python, torch and triton come from requirements.lock and satisfy pyproject.toml, the entry point is the `lorafleet`
console script the manifests call, the user is the one the manifests run as, and the final image
keeps the C toolchain Triton needs at run time."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy.manifests import OVERLAYS, REPO, lorafleet_containers, rendered, workloads

UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12", "26.04": "3.14"}  # each release's python3


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest of line)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults before the first FROM, stages), continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args, stages = {}, []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_substitute(words[0], global_args), name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """`stage` and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def test_cuda_base_image_with_a_python_the_project_accepts(dockerfile, pyproject):
    _args, stages = dockerfile
    root = _chain(stages, stages[-1])[-1]
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+(?:\.\d+)?)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", root.base)
    assert match, f"the image must start from an nvidia/cuda image, not {root.base!r}"
    python = UBUNTU_PYTHON[match.group(3)]
    assert Version(python) in Requirement(f"python{pyproject['project']['requires-python']}").specifier


def _locked(name: str) -> Version:
    (line,) = [ln for ln in (REPO / "requirements.lock").read_text().splitlines() if ln.startswith(f"{name}==")]
    return Version(line.split("==", 1)[1].split(";")[0].strip())


def _project_extras(run: str) -> set[str] | None:
    """The extras a `pip install -c requirements.lock .` / `".[engine]"` RUN installs the project
    with (empty set: none); None when the RUN does not install the project through the lock."""
    words = shlex.split(run)
    if words[:4] != ["pip", "install", "-c", "requirements.lock"]:
        return None
    for word in words[4:]:
        match = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", word)
        if match:
            return {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}
    return None


def _installed_extras(stages: list[Stage]) -> set[str]:
    runs = [rest for s in stages for kw, rest in s.instructions if kw == "RUN"]
    found = [e for e in (_project_extras(r) for r in runs) if e is not None]
    assert found, "the image must install the project with `pip install -c requirements.lock .[extras]`"
    return set().union(*found)


def test_image_installs_the_locked_torch_and_triton_which_satisfy_pyproject(dockerfile, pyproject):
    _args, stages = dockerfile
    build = next(s for s in stages if s.name == "build")
    # the project's requirements as the image installs them: its dependencies and those of the
    # extras it names (torch and triton are the `engine` extra's: the services need it)
    optional = pyproject["project"].get("optional-dependencies", {})
    extras = sorted(_installed_extras(stages))
    requirements = pyproject["project"]["dependencies"] + [d for extra in extras for d in optional[extra]]
    deps = {Requirement(d).name: Requirement(d) for d in requirements}
    assert {"torch", "triton"} <= deps.keys(), "the image must install the extra that holds torch and triton"
    for name in ("torch", "triton"):
        assert _locked(name) in deps[name].specifier, (name, _locked(name), str(deps[name].specifier))
    runs = [rest for kw, rest in build.instructions if kw == "RUN"]
    assert any(shlex.split(r)[:4] == ["pip", "install", "-c", "requirements.lock"] and {"torch", "triton"} <= set(shlex.split(r))
               for r in runs), "torch and triton must be installed through the lock"
    # every pip install of the image goes through the lock
    assert all("-c requirements.lock" in r for r in runs if "pip install" in r)


def test_copied_sources_exist_are_not_ignored_and_cover_the_package(dockerfile, pyproject):
    _args, stages = dockerfile
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied = set()
    for stage in stages:
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD") and not rest.startswith("--from"):
                *sources, _dest = shlex.split(rest)
                for source in sources:
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                    assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
                    copied.add(source.rstrip("/"))
    needed = {"pyproject.toml", "requirements.lock", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert needed <= copied, f"pip install . needs {sorted(needed - copied)}"
    assert _installed_extras(stages) <= pyproject["project"].get("optional-dependencies", {}).keys()


def test_project_install_parser():
    assert _project_extras("pip install -c requirements.lock .") == set()
    assert _project_extras('pip install -c requirements.lock ".[engine]" && lorafleet --help') == {"engine"}
    assert _project_extras("pip install -c requirements.lock .[engine,bench]") == {"engine", "bench"}
    assert _project_extras("pip install -c requirements.lock torch triton") is None
    assert _project_extras("pip install .") is None


def test_dockerignore_matcher():
    assert _dockerignored("services/x/__pycache__/a.pyc", ["**/__pycache__"])
    assert _dockerignored("tests/deploy", ["tests"]) and not _dockerignored("services", ["tests"])


def test_entrypoint_is_the_console_script_the_manifests_run(dockerfile, pyproject):
    _args, stages = dockerfile
    final = stages[-1].instructions
    (entrypoint,) = [rest for kw, rest in final if kw == "ENTRYPOINT"]
    assert entrypoint == '["lorafleet"]'
    assert "lorafleet" in pyproject["project"]["scripts"]
    for overlay in OVERLAYS:
        assert {tuple(c.spec["command"]) for c in lorafleet_containers(rendered(overlay))} == {("lorafleet",)}


def test_user_matches_the_manifests(dockerfile):
    _args, stages = dockerfile
    (user,) = [rest for kw, rest in stages[-1].instructions if kw == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    for overlay in OVERLAYS:
        for workload in workloads(rendered(overlay)):
            context = workload["spec"]["template"]["spec"]["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), workload["metadata"]["name"]
            assert context["runAsNonRoot"] is True


def test_final_image_keeps_what_triton_compiles_with_and_the_build_venv_matches(dockerfile):
    _args, stages = dockerfile
    final, build = stages[-1], next(s for s in stages if s.name == "build")
    installs = " ".join(rest for s in _chain(stages, final) for kw, rest in s.instructions if kw == "RUN")
    for package in ("gcc", "python3-dev", "libc6-dev"):
        assert re.search(rf"\b{re.escape(package)}\b", installs), f"the final image lacks {package}"
    # The venv copied from the build stage points at that stage's python3: same system stage.
    assert final.base == build.base
    assert any(kw == "COPY" and rest.startswith("--from=build /opt/lorafleet") for kw, rest in final.instructions)
