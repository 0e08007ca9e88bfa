"""Manifests and code cannot drift apart: what the manifests give each container (command,
arguments, probe commands, environment) is accepted by lorafleet's own configuration parser.

- every LORAFLEET_* variable (env, envFrom ConfigMaps, the Secret) is declared in
  services/common/settings.py and its value parses with the declared type;
- every other variable is one lorafleet's libraries read (AWS_* for obstore's S3 client);
- every args list and probe command parses with lorafleet.cli.build_parser() under that
  environment, and the service's frozen config builds from it (its own range checks included).
"""

from __future__ import annotations

import os

import pytest

from lorafleet.cli import build_parser
from lorafleet.common import settings
from tests.deploy.manifests import OVERLAYS, container_env, lorafleet_containers, probes, rendered, secret_example

FOREIGN_PREFIXES = ("AWS_",)  # obstore's S3Store reads the usual AWS variables itself (CONTRACT section 3)
SUBCOMMANDS = {"ingest", "engine", "adapter-store", "gateway"}


def _check_variables(where: str, env: dict[str, str]) -> None:
    for name, value in env.items():
        if name.startswith(settings.PREFIX):
            short = name[len(settings.PREFIX):]
            assert short in settings.ENV_VARS, f"{where}: {name} is not declared in services/common/settings.py"
            settings.read(short, {name: value})  # ValueError names the variable and value
        else:
            assert name.startswith(FOREIGN_PREFIXES), f"{where}: {name} is neither LORAFLEET_* nor read by a library we use"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_is_declared_and_parses(overlay):
    objects = rendered(overlay)
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        _check_variables(f"ConfigMap/{config_map['metadata']['name']}", config_map.get("data", {}))
    _check_variables("secret.example.yaml", secret_example()["stringData"])
    containers = lorafleet_containers(objects)
    assert {c.subcommand for c in containers} == SUBCOMMANDS
    for container in containers:
        _check_variables(container.where, container_env(container, objects))


def test_an_undeclared_variable_is_caught():
    with pytest.raises(AssertionError, match="LORAFLEET_REDIS_ULR is not declared"):
        _check_variables("test", {"LORAFLEET_REDIS_ULR": "redis://x"})
    with pytest.raises(ValueError, match="LORAFLEET_WORK_PARTITIONS"):
        _check_variables("test", {"LORAFLEET_WORK_PARTITIONS": "eight"})


def _parse(argv: list[str], env: dict[str, str], monkeypatch, where: str):
    """build_parser() under exactly `env` (flag defaults come from it), then parse `argv`."""
    for name in [n for n in os.environ if n.startswith(settings.PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: lorafleet rejects {argv} (exit {exc.code}; argparse says why above)") from None


def _build_config(args, env: dict[str, str]):
    """The service's frozen config, as `lorafleet <service>` builds it (its checks run)."""
    if args.command == "ingest":
        from lorafleet.ingest.config import IngestConfig

        return IngestConfig.from_args(args)
    if args.command == "engine":
        from lorafleet.engine.serving.config import EngineServiceConfig

        return EngineServiceConfig.from_args(args)
    if args.command == "gateway":
        from lorafleet.gateway.config import GatewayConfig

        return GatewayConfig.from_args(args)
    from lorafleet.adapter_store.config import AdapterStoreConfig

    return AdapterStoreConfig.from_env_and_args(model_dir=args.model, adapters_root=args.adapters,
                                                address=args.address, shm_dir=args.shm_dir, environ=env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_args_and_probe_commands_parse_and_build_configs(overlay, monkeypatch):
    objects = rendered(overlay)
    for container in lorafleet_containers(objects):
        env = container_env(container, objects)
        # Empty model / adapters would make `lorafleet` build the demo model inside the pod.
        assert env.get("LORAFLEET_MODEL"), f"{container.where}: LORAFLEET_MODEL must be set"
        if container.subcommand == "adapter-store":
            assert env.get("LORAFLEET_ADAPTERS"), f"{container.where}: LORAFLEET_ADAPTERS must be set"
        args = _parse(container.spec["args"], env, monkeypatch, container.where)
        assert args.command == container.subcommand and args.check is None
        config = _build_config(args, env)
        assert config is not None
        for kind, probe in probes(container).items():
            command = probe["exec"]["command"]
            assert command[0] == "lorafleet", f"{container.where} {kind}: {command}"
            probe_args = _parse(command[1:], env, monkeypatch, f"{container.where} {kind}")
            assert probe_args.command == container.subcommand, f"{container.where} {kind} checks another service"
            assert probe_args.check in ("live", "ready")


def test_a_bad_argument_is_caught(monkeypatch):
    with pytest.raises(AssertionError, match="lorafleet rejects"):
        _parse(["engine", "--pool-pages", "many"], {}, monkeypatch, "test")
    with pytest.raises(AssertionError, match="lorafleet rejects"):
        _parse(["engine", "--check", "alive"], {}, monkeypatch, "test")
