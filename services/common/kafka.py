"""Kafka plumbing shared by the services: topic creation, client factories, transient retries.

Tansu (the embedded broker) notes, verified against tansu 0.6.0 with aiokafka 0.14:
- no idempotent producer: every producer here has enable_idempotence=False; acks="all".
- producing to a missing topic auto-creates it with ONE partition: create topics first.
- CreateTopics on an existing topic answers error 36 (TOPIC_ALREADY_EXISTS) in the response
  body instead of raising; :func:`ensure_topics` reads the per-topic codes.
- joining a consumer group takes about session_timeout_ms / 2 (5 s at Kafka's default 10 s);
  tests use a short session timeout.
- delivery latency follows fetch_max_wait_ms: ~50 ms at aiokafka's default 500, ~3 ms at the
  100 used here.
- consumer groups with manual commits, several partitions, members joining and leaving
  (rebalance) and resuming from committed offsets all work.
- admin list_consumer_groups answers empty and list_consumer_group_offsets fails to decode: use
  a consumer's committed() to read group offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from lorafleet.common import settings
from lorafleet.common.logging import get_logger
from lorafleet.common.retry import retry_transient

T = TypeVar("T")
TOPIC_ALREADY_EXISTS = 36
_log = get_logger("kafka")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = 1
    replication: int = 1


class TopicCreationError(RuntimeError):
    pass


def is_transient_kafka_error(exc: BaseException) -> bool:
    """Connection trouble, timeouts, leader changes: worth retrying. Everything else is fatal."""
    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


async def with_kafka_retries(operation: Callable[[], Awaitable[T]], what: str,
                             budget_s: float | None = None) -> T:
    """Retry `operation` on transient Kafka errors for LORAFLEET_KAFKA_RETRY_S seconds."""
    budget = budget_s if budget_s is not None else settings.read("KAFKA_RETRY_S")
    return await retry_transient(operation, is_transient=is_transient_kafka_error, budget_s=budget,
                                 log=_log, what=what)


async def ensure_topics(bootstrap: str, topics: list[TopicSpec], budget_s: float | None = None) -> None:
    """Create the topics that are missing; existing ones are left as they are (their partition
    count included). Safe when several services race to create the same topic."""

    async def attempt() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="lorafleet-admin", **security_options())
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t.name not in existing]
            if not missing:
                return
            response = await admin.create_topics(
                [NewTopic(t.name, t.partitions, t.replication) for t in missing])
            for topic_error in response.topic_errors:
                name, code = topic_error[0], topic_error[1]
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise TopicCreationError(f"creating topic {name!r} failed with Kafka error code {code}: "
                                             f"{topic_error[2] if len(topic_error) > 2 else ''}")
            _log.info("topics created", topics=[t.name for t in missing])
        finally:
            await admin.close()

    await with_kafka_retries(attempt, "create topics", budget_s)


async def partition_count(producer: AIOKafkaProducer, topic: str) -> int:
    partitions = await with_kafka_retries(lambda: producer.partitions_for(topic), f"metadata {topic}")
    if not partitions:
        raise TopicCreationError(f"topic {topic!r} has no partitions")
    return len(partitions)


PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def security_options(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """aiokafka's security arguments from the LORAFLEET_KAFKA_* settings, for every Kafka client
    (producers, consumers, admin clients, the probes); ValueError naming the variable when they
    do not fit together."""
    protocol = settings.read("KAFKA_SECURITY_PROTOCOL", environ).upper()
    mechanism = settings.read("KAFKA_SASL_MECHANISM", environ).upper()
    user, password = settings.read("KAFKA_SASL_USERNAME", environ), settings.read("KAFKA_SASL_PASSWORD", environ)
    cafile, certfile, keyfile = (settings.read(n, environ) for n in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE",
                                                                     "KAFKA_SSL_KEYFILE"))
    if protocol not in PROTOCOLS:
        raise ValueError(f"LORAFLEET_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"LORAFLEET_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)} with "
                             f"{protocol}, got {mechanism!r}")
        if not user or not password:
            raise ValueError(f"{protocol} needs LORAFLEET_KAFKA_SASL_USERNAME and LORAFLEET_KAFKA_SASL_PASSWORD")
        options.update(sasl_mechanism=mechanism, sasl_plain_username=user, sasl_plain_password=password)
    elif mechanism or user or password:
        raise ValueError(f"SASL settings are given but LORAFLEET_KAFKA_SECURITY_PROTOCOL is {protocol}: use SASL_SSL "
                         "or SASL_PLAINTEXT")
    if protocol.endswith("SSL"):
        if bool(certfile) != bool(keyfile):
            raise ValueError("mutual TLS needs both LORAFLEET_KAFKA_SSL_CERTFILE and LORAFLEET_KAFKA_SSL_KEYFILE")
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(cafile=cafile or None, certfile=certfile or None,
                                                    keyfile=keyfile or None)
    elif cafile or certfile or keyfile:
        raise ValueError(f"TLS files are given but LORAFLEET_KAFKA_SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
    return options


def make_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer whose sends are durable once awaited (acks=all), never idempotent (Tansu)."""
    options: dict[str, Any] = dict(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all",
                                   linger_ms=2, request_timeout_ms=30000, **security_options())
    options.update(overrides)
    options["enable_idempotence"] = False
    return AIOKafkaProducer(**options)


def make_consumer(bootstrap: str, topics: list[str], group_id: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer-group member that commits only what the caller commits (no auto commit) and
    starts a new group at the earliest offset (no request is skipped).

    Partitions are assigned sticky: a rebalance moves only the partitions it must (those of a
    member that left, or a share for one that joined). Engines hold the adapters of their
    partitions, and aiokafka's default round-robin moved nearly every partition at each
    membership change, re-homing almost every adapter (bench/results/fleet-sim: 98-100 % moved,
    77-80 % of requests on an engine holding their adapter over a run with a failure and a join,
    against 5 % moved and 91 % with sticky). Round robin stays second in the list so a group
    whose older members know only it still agrees on a protocol during a rolling upgrade."""
    session_ms = overrides.pop("session_timeout_ms", settings.read("KAFKA_SESSION_TIMEOUT_MS"))
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 5), fetch_max_wait_ms=100,
        partition_assignment_strategy=(StickyPartitionAssignor, RoundRobinPartitionAssignor), **security_options(),
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)
