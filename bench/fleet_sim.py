"""Routing at fleet scale, simulated: 1,000 engines, 100,000 adapters, failures and joins.

One discrete-event run per (policy, popularity, partitions) on the same trace. The Kafka path:
the ingest routes each request to a work partition (`affinity`: the ingest's own Router, `hash`:
the request id's hash); the partition's owner in the engines' consumer group (aiokafka's
assignor, bench/fleet_policies.py) queues it. When engines fail, their partitions stall until the
session timeout drops them from the group; every membership change (failure found, engine joined)
rebalances the group: nothing is consumed for `rebalance_s`, and each member's revoke aborts its
in-flight requests (lorafleet's engine does so for revoked partitions, and aiokafka's eager
protocol revokes them all), which the new owners serve again from the last commit. The gateway
path (`gateway-lora-affinity`) picks an engine per request from live state, without partitions.
Engines: bench/fleet_engines.py; setup and trace: bench/fleet_setup.py; output: fleet_report.py.

    python -m lorafleet.bench.fleet_sim            # ~13 min on 2 cores: bench/results/fleet-sim/
    python -m lorafleet.bench.fleet_sim --quick    # a small fleet in seconds
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from collections import deque
from dataclasses import replace

import numpy as np

from lorafleet.bench.fleet_engines import FINISH, SimEngines
from lorafleet.bench.fleet_metrics import RunMetrics
from lorafleet.bench.fleet_policies import GATEWAY_POLICY, ConsumerGroup, GatewayPicker, make_partition_route
from lorafleet.bench.fleet_setup import FleetSetup, Trace, generate_fleet_trace

FAIL, JOIN, DETECT, REBALANCE_END = 1, 2, 3, 4  # control events on the heap, after FINISH (0)


class FleetRun:
    def __init__(self, setup: FleetSetup, trace: Trace, policy: str, n_partitions: int | None,
                 assignor: str = "roundrobin") -> None:
        self.setup, self.trace, self.policy, self.assignor = setup, trace, policy, assignor
        self.adapter_of = trace.adapter.tolist()
        self.gateway = policy == GATEWAY_POLICY
        self.engines = SimEngines(setup.engine, setup.max_engines, self.adapter_of, trace.output_len.tolist(),
                                  track_adapters=self.gateway)
        self.metrics = RunMetrics(setup, len(trace), self.adapter_of)
        self.engines.on_start = self.metrics.started
        self.rng = np.random.default_rng(setup.seed + 1)
        self.now = 0.0
        self.next_engine = setup.engines
        if self.gateway:
            self.picker = GatewayPicker(self.engines, setup.max_engines, self.rng)
            self.lost: dict[int, list[int]] = {}  # dead engine -> requests sent to it before it was found
        else:
            self.n_partitions = n_partitions
            self.route = make_partition_route(policy, n_partitions, setup.hot_adapter_rps, setup.hot_window_s,
                                              clock=lambda: self.now)
            self.group = ConsumerGroup(n_partitions, self.rng, assignor)
            self.partition_of = [0] * len(trace)
            self.backlog = [deque() for _ in range(n_partitions)]
            self.rebalancing_until = -1.0
            self.rebalancing = False
        for engine in range(setup.engines):
            self._bring_up(engine)
        if not self.gateway:
            self.owner = self.group.owners()
            self.assigned = self.owner  # the last rebalance's owners, before any failure stalls them
            self.moved: list[float] = []  # per rebalance: the share of partitions that changed owner
        for event in setup.events:
            self._push(event.at_s, JOIN if event.kind == "join" else FAIL, event.engines)

    def run(self) -> dict:
        heap, engines = self.engines.heap, self.engines
        arrivals = self.trace.arrival.tolist()
        i, n = 0, len(arrivals)
        while i < n or heap:
            if heap and (i >= n or heap[0][0] <= arrivals[i]):
                t, _, kind, x, y = heapq.heappop(heap)
                self.now = t
                if kind == FINISH:
                    if engines.attempt[x] == y:
                        engine = engines.finish(x, t)
                        self.metrics.completed(x, t)
                        if self.gateway:
                            self.picker.refresh(engine)
                else:
                    self._control(kind, x, y, t)
            else:
                self.now = arrivals[i]
                self._arrive(i, arrivals[i])
                i += 1
        row = self.metrics.summary(self.policy, getattr(self, "n_partitions", None), self.trace)
        row["assignor"] = None if self.gateway else self.assignor
        row["partitions_moved"] = None if self.gateway else [round(m, 4) for m in self.moved]
        row["hot_adapter_rps"] = self.setup.hot_adapter_rps
        return row

    # --- requests ---------------------------------------------------------------------------
    def _arrive(self, r: int, now: float) -> None:
        started = time.perf_counter()
        if self.gateway:
            target = self.picker.pick(self.adapter_of[r])
        else:
            target = self.route(f"request-{r}", f"adapter-{self.adapter_of[r]}")
        self.metrics.routing_s += time.perf_counter() - started
        if self.gateway:
            self._send_to_engine(r, target, now)
        else:
            self.partition_of[r] = target
            self._deliver(r, target, now)

    def _deliver(self, r: int, partition: int, now: float) -> None:
        owner = self.owner[partition]
        if owner < 0 or now < self.rebalancing_until:
            self.backlog[partition].append(r)
        else:
            self.engines.enqueue(owner, r, now)

    def _send_to_engine(self, r: int, engine: int, now: float) -> None:
        if not self.engines.alive[engine]:  # dead, and the picker does not know yet
            self.lost.setdefault(engine, []).append(r)
            return
        self.engines.enqueue(engine, r, now)
        self.picker.refresh(engine)

    # --- membership -------------------------------------------------------------------------
    def _control(self, kind: int, x, y, now: float) -> None:
        if kind == FAIL:
            live = [e for e in range(self.next_engine) if self.engines.alive[e]]
            dead = sorted(self.rng.choice(live, size=min(x, len(live) - 1), replace=False).tolist())
            for engine in dead:
                self.metrics.engine_down(engine, now)
                aborted = self.engines.take_all(engine, kill=True)
                self.metrics.restarts += len(aborted)
                if self.gateway:
                    self.lost[engine] = aborted
                else:
                    self.owner = [-1 if o == engine else o for o in self.owner]
                    for r in aborted:
                        self.backlog[self.partition_of[r]].append(r)
            self._push(now + self.setup.session_timeout_s, DETECT, tuple(dead))
        elif kind == JOIN:
            for _ in range(x):
                self._bring_up(self.next_engine)
                self.metrics.engine_up(self.next_engine, now)
                self.next_engine += 1
            if not self.gateway:
                self._rebalance(now)
        elif kind == DETECT:
            for engine in x:
                if self.gateway:
                    self.picker.candidate[engine] = False
                    for r in sorted(self.lost.pop(engine, ())):
                        self._send_to_engine(r, self.picker.pick(self.adapter_of[r]), now)
                else:
                    self.group.leave(engine)
            if not self.gateway:
                self._rebalance(now)
        elif kind == REBALANCE_END and now >= self.rebalancing_until and self.rebalancing:
            self.rebalancing = False
            for engine in set(self.group.members.values()):
                if not self.engines.alive[engine]:  # a dead member does not rejoin: the rebalance drops it
                    self.group.leave(engine)
            self.owner = self.group.owners()
            self.moved.append(sum(a != b for a, b in zip(self.assigned, self.owner)) / self.n_partitions)
            self.assigned = self.owner
            for partition, waiting in enumerate(self.backlog):
                if waiting:
                    self.backlog[partition] = deque()
                    for r in sorted(waiting):  # redelivered from the last commit: offset order
                        self._deliver(r, partition, now)

    def _rebalance(self, now: float) -> None:
        if now >= self.rebalancing_until and self.setup.restart_on_rebalance:
            for engine in range(self.next_engine):
                if self.engines.alive[engine]:
                    aborted = self.engines.take_all(engine, kill=False)
                    self.metrics.restarts += len(aborted)
                    for r in aborted:
                        self.backlog[self.partition_of[r]].append(r)
        self.rebalancing = True  # one REBALANCE_END acts: the last one scheduled
        self.rebalancing_until = now + self.setup.rebalance_s
        self._push(self.rebalancing_until, REBALANCE_END, None)

    def _bring_up(self, engine: int) -> None:
        self.engines.bring_up(engine)
        if self.gateway:
            self.picker.candidate[engine] = True
            self.picker.refresh(engine)
        else:
            self.group.join(engine)

    def _push(self, at: float, kind: int, payload) -> None:
        self.engines.seq += 1
        heapq.heappush(self.engines.heap, (at, self.engines.seq, kind, payload, None))


def run_matrix(setup: FleetSetup, alphas: tuple[float, ...], partition_factors: tuple[int, ...],
               hot_rps_variant: float = 0.0, log=print) -> list[dict]:
    """Every policy on the same trace per popularity; the Kafka policies per partition count; the
    Router under the sticky assignor, and with `hot_rps_variant` as its hot threshold (if > 0)."""
    rows = []
    base = partition_factors[0] * setup.engines
    for alpha in alphas:
        trace = generate_fleet_trace(setup, alpha)
        plans = [(policy, factor * setup.engines, "roundrobin", setup) for factor in partition_factors
                 for policy in ("affinity", "hash")]
        plans.append(("affinity", base, "sticky", setup))
        if hot_rps_variant > 0:
            plans.append(("affinity", base, "sticky", replace(setup, hot_adapter_rps=hot_rps_variant)))
        plans.append((GATEWAY_POLICY, None, None, setup))
        for policy, partitions, assignor, run_setup in plans:
            started = time.perf_counter()
            row = FleetRun(run_setup, trace, policy, partitions, assignor or "roundrobin").run()
            row.update(alpha=alpha, wall_s=time.perf_counter() - started,
                       hot_variant=run_setup.hot_adapter_rps != setup.hot_adapter_rps)
            rows.append(row)
            log(f"alpha {alpha} {policy} P={partitions} {assignor}: {row['requests']} requests, "
                f"hit {row['hit_rate']:.1%}, "
                f"loads/s {row['adapter_loads_per_s']:.0f}, {row['wall_s']:.0f} s", file=sys.stderr)
    return rows


QUICK = FleetSetup(engines=40, adapters=4000, duration_s=30.0, events=(replace(FleetSetup().events[0], at_s=10.0,
                   engines=4), replace(FleetSetup().events[1], at_s=20.0, engines=4)), session_timeout_s=4.0)


def main(argv: list[str] | None = None) -> None:
    from lorafleet.bench.fleet_report import RESULTS, rewrite, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 engines, 4,000 adapters, 30 s (tests, smoke runs)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1.0], help="popularity (1: uniform)")
    p.add_argument("--partition-factors", type=int, nargs="+", default=[1, 2], help="partitions per engine")
    p.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the setup's)")
    p.add_argument("--hot-rps-variant", type=float, default=5.0,
                   help="also run the Router (sticky group) with this hot threshold per partition; 0: no")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--replot", action="store_true", help="only redraw the markdown and plots from --out's JSON")
    args = p.parse_args(argv)
    if args.replot:
        rewrite(args.out)
        return
    setup = QUICK if args.quick else FleetSetup()
    if args.duration:
        setup = replace(setup, duration_s=args.duration)
    started = time.perf_counter()
    rows = run_matrix(setup, tuple(args.alphas), tuple(args.partition_factors), args.hot_rps_variant)
    write_results(setup, rows, args.out, wall_s=time.perf_counter() - started)


if __name__ == "__main__":
    main()
