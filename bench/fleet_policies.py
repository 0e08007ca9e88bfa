"""Who serves a request in the fleet simulation: the consumer group's partition owners, and the
three routing policies compared on one trace.

    affinity               lorafleet.ingest.routing.Router.route (the ingest's own code, its clock
                           the simulation's): request -> work partition -> the partition's owner
    hash                   stable_hash(request id) % partitions -> owner (plain key hashing)
    gateway-lora-affinity  the Kubernetes Gateway API inference extension's endpoint picker with
                           its lora-affinity-scorer and queue-scorer, weight 1 each, and the
                           max-score picker (ties at random): it picks an ENGINE from every
                           engine's live state, which lorafleet's Kafka path has no view of

The lora-affinity-scorer (pkg/epp/scheduling/framework/plugins/scorer/lora_affinity.go) gives
1.0 where the adapter is active (a running request uses it), else 0.8 where the engine's active
plus waiting adapters are fewer than its max_lora, else 0.6 where the adapter waits there, else 0;
the queue-scorer gives (max queue - queue) / (max - min) over the candidates (1 when all equal).
Differences from a deployment: engine state is exact at every request (the picker scrapes
metrics every tens of milliseconds); the kv-cache-utilization and prefix scorers of the default
profile are left out (no shared prefixes here; KV use follows the queue); max_lora is the engine's
adapter_slots, as lorafleet's vllm:lora_requests_info gauge reports it.
"""

from __future__ import annotations

import numpy as np
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.structs import TopicPartition

from lorafleet.bench.fleet_engines import SimEngines
from lorafleet.ingest.routing import Router, stable_hash

WORK_TOPIC = "lorafleet.work"
KAFKA_POLICIES = ("affinity", "hash")
GATEWAY_POLICY = "gateway-lora-affinity"


class _TopicLayout(ClusterMetadata):
    """The one piece of cluster metadata an assignor reads: the work topic's partitions."""

    def __init__(self, n_partitions: int) -> None:
        super().__init__()
        self._work_partitions = set(range(n_partitions))

    def partitions_for_topic(self, topic: str):
        return self._work_partitions if topic == WORK_TOPIC else None

    def topics(self, exclude_internal_topics: bool = True) -> set[str]:
        return {WORK_TOPIC}


ASSIGNORS = {"roundrobin": RoundRobinPartitionAssignor, "sticky": StickyPartitionAssignor}


class ConsumerGroup:
    """The engines' consumer group on the work topic, assigned by aiokafka's own assignors:
    "roundrobin" is aiokafka's default and what lorafleet's engines use (partitions in order,
    dealt over the member ids in sorted order, so one member more or less shifts most of them);
    "sticky" (StickyPartitionAssignor) keeps each member's previous partitions, which members
    send in their join metadata. Member ids are "<client id>-<uuid>" as the broker makes them."""

    def __init__(self, n_partitions: int, rng: np.random.Generator, assignor: str = "roundrobin") -> None:
        self.n_partitions = n_partitions
        self.layout = _TopicLayout(n_partitions)
        self.rng = rng
        self.assignor = ASSIGNORS[assignor]
        self.members: dict[str, int] = {}  # member id -> engine
        self.previous: dict[str, list[int]] = {}  # member id -> partitions of the last assignment

    def join(self, engine: int) -> None:
        self.members[f"aiokafka-0.14.0-{self.rng.bytes(16).hex()}"] = engine

    def leave(self, engine: int) -> None:
        self.members = {m: e for m, e in self.members.items() if e != engine}

    def owners(self) -> list[int]:
        """partition -> engine that consumes it (-1 when the group is empty)."""
        assignment = self.assignor.assign(self.layout, {m: self._metadata(m) for m in self.members})
        owner = [-1] * self.n_partitions
        self.previous = {}
        for member, member_assignment in assignment.items():
            for _topic, partitions in member_assignment.assignment:
                self.previous[member] = list(partitions)
                for p in partitions:
                    owner[p] = self.members[member]
        return owner

    def _metadata(self, member: str) -> ConsumerProtocolMemberMetadata:
        if self.assignor is RoundRobinPartitionAssignor:
            return ConsumerProtocolMemberMetadata(0, [WORK_TOPIC], b"")
        previous = self.previous.get(member)
        held = None if previous is None else [TopicPartition(WORK_TOPIC, p) for p in previous]
        return StickyPartitionAssignor._metadata([WORK_TOPIC], held, 1)


def make_partition_route(policy: str, n_partitions: int, hot_rps: float, window_s: float, clock):
    """(request id, adapter name) -> partition, for a Kafka-path policy."""
    if policy == "affinity":
        return Router(n_partitions, hot_rps, window_s, clock=clock).route
    if policy == "hash":
        return lambda request_id, adapter: stable_hash(request_id) % n_partitions
    raise ValueError(f"unknown policy {policy!r}; expected one of {KAFKA_POLICIES}")


class GatewayPicker:
    """The inference extension's endpoint choice over the live engines (see module doc)."""

    def __init__(self, engines: SimEngines, max_engines: int, rng: np.random.Generator) -> None:
        self.engines = engines
        self.rng = rng
        self.max_lora = engines.model.adapter_slots
        self.candidate = np.zeros(max_engines, dtype=bool)  # alive and not yet found dead
        self.distinct = np.zeros(max_engines, dtype=np.int64)  # running + waiting adapters
        self.queued = np.zeros(max_engines, dtype=np.int64)

    def refresh(self, engine: int) -> None:
        """Read one engine's state after it changed (the picker's scrape, made exact)."""
        self.distinct[engine] = self.engines.distinct_adapters(engine)
        self.queued[engine] = len(self.engines.queue[engine])

    def pick(self, adapter: int) -> int:
        alive = self.candidate
        queued = self.queued
        live_queues = queued[alive]
        low, high = live_queues.min(), live_queues.max()
        score = np.where(self.distinct < self.max_lora, 0.8, 0.0)
        for e in self.engines.waiting_on.get(adapter, ()):
            score[e] = max(score[e], 0.6)
        for e in self.engines.active_on.get(adapter, ()):
            score[e] = 1.0
        score += 1.0 if high == low else (high - queued) / (high - low)
        score[~alive] = -1.0
        best = np.flatnonzero(score == score.max())
        return int(best[self.rng.integers(len(best))] if len(best) > 1 else best[0])
