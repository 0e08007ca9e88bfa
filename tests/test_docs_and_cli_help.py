"""What a newcomer reads must be true: the README's and docs' links resolve, the README speaks in
plain words (no tracker numbers), and every flag's --help names the LORAFLEET_* variable behind it
(or says why a flag has none, like a request's own fields)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lorafleet.cli import build_parser
from lorafleet.common import settings

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", link):
            continue
        if not (doc.parent / link.split("#")[0]).exists():
            broken.append(link)
    assert not broken, f"{doc.name}: links to missing files {broken}"


def test_readme_names_no_issue_numbers():
    assert not re.search(r"\bissues? \d+", (REPO / "README.md").read_text(), re.I)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_of_every_command_names_its_variable_or_says_why_not():
    commands = _subcommands(build_parser())
    assert {"up", "ingest", "engine", "adapter-store", "demo", "send", "tail"} <= set(commands)
    missing = []
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            found = re.search(r"\[env (LORAFLEET_\w+)[,;]", text)
            if found:
                assert found.group(1).removeprefix(settings.PREFIX) in settings.ENV_VARS, (name, action.dest)
            elif "[no env" not in text:
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"flags without their LORAFLEET_* variable in --help: {missing}"


def test_up_names_its_fallbacks_instead_of_the_services_defaults(monkeypatch):
    # `up` starts an embedded broker and redis-server when neither flag nor variable names one:
    # its help must say so rather than show the services' 127.0.0.1 defaults.
    monkeypatch.delenv("LORAFLEET_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("LORAFLEET_REDIS_URL", raising=False)
    up = _subcommands(build_parser())["up"]
    flags = {a.dest: a for a in up._actions}
    assert flags["kafka_bootstrap"].default == "" and "unset: an embedded broker" in flags["kafka_bootstrap"].help
    assert flags["redis_url"].default == "" and "unset: an embedded redis-server" in flags["redis_url"].help
    monkeypatch.setenv("LORAFLEET_KAFKA_BOOTSTRAP", "kafka:9092")
    assert _subcommands(build_parser())["up"].parse_args([]).kafka_bootstrap == "kafka:9092"
