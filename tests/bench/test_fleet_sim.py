"""The fleet simulation (bench/fleet_sim.py) on small fleets: what it claims to model holds."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from lorafleet.bench import fleet_policies
from lorafleet.bench.fleet_engines import SimEngines
from lorafleet.bench.fleet_policies import ConsumerGroup, GatewayPicker
from lorafleet.bench.fleet_setup import EngineModel, FleetEvent, FleetSetup, generate_fleet_trace
from lorafleet.bench.fleet_sim import FleetRun, main
from lorafleet.ingest.routing import Router

SMALL = FleetSetup(engines=16, adapters=2000, duration_s=16.0, session_timeout_s=3.0, imbalance_window_s=4.0,
                   events=(FleetEvent(6.0, "fail", 3), FleetEvent(9.0, "join", 2), FleetEvent(11.0, "fail", 2)))
POLICIES = [("affinity", 16), ("affinity", 48), ("hash", 16), ("gateway-lora-affinity", None)]


def run(policy, partitions, alpha=0.3, setup=SMALL):
    return FleetRun(setup, generate_fleet_trace(setup, alpha), policy, partitions).run()


def test_affinity_finds_adapters_resident_far_more_often_than_hashing():
    trace = generate_fleet_trace(SMALL, 0.3)
    affinity = FleetRun(SMALL, trace, "affinity", 16).run()
    hashed = FleetRun(SMALL, trace, "hash", 16).run()
    assert affinity["hit_rate"] > hashed["hit_rate"] + 0.2
    assert affinity["adapter_loads"] < hashed["adapter_loads"]


@pytest.mark.parametrize("policy,partitions", POLICIES)
def test_every_request_is_served_exactly_once_across_failures_and_joins(policy, partitions):
    row = run(policy, partitions)
    assert row["served_once"] and row["unserved"] == 0 and row["served_twice_or_more"] == 0
    assert row["restarted_attempts"] > 0  # the failures did abort work that had to be redone
    assert row["requests"] == len(generate_fleet_trace(SMALL, 0.3))


def test_the_kafka_path_routes_every_request_through_the_ingest_router(monkeypatch):
    calls = []

    class SpyRouter(Router):
        def route(self, request_id, adapter):
            partition = super().route(request_id, adapter)
            calls.append((request_id, adapter, partition))
            return partition

    monkeypatch.setattr(fleet_policies, "Router", SpyRouter)
    row = run("affinity", 16)
    assert len(calls) == row["requests"]
    assert all(0 <= p < 16 and a.startswith("adapter-") for _, a, p in calls)


def test_a_seed_gives_the_same_results():
    first, second = run("gateway-lora-affinity", None), run("gateway-lora-affinity", None)
    for row in (first, second):
        row.pop("routing_us_per_request")
    assert first == second
    other = FleetRun(replace(SMALL, seed=7), generate_fleet_trace(replace(SMALL, seed=7), 0.3),
                     "gateway-lora-affinity", None).run()
    assert other["requests"] != first["requests"] or other["hit_rate"] != first["hit_rate"]


def test_the_group_deals_partitions_round_robin_over_sorted_member_ids():
    group = ConsumerGroup(10, np.random.default_rng(0))
    for engine in range(4):
        group.join(engine)
    owners = group.owners()
    members = sorted(group.members)
    assert owners == [group.members[members[p % 4]] for p in range(10)]
    group.leave(2)
    assert 2 not in group.owners() and -1 not in group.owners()


def test_the_gateway_scorer_prefers_active_adapter_then_a_free_slot_then_the_shorter_queue():
    model = EngineModel(max_running=2, adapter_slots=2)
    adapter_of = [7, 7, 8, 9, 9, 9]
    engines = SimEngines(model, 3, adapter_of, [100] * 6, track_adapters=True)
    engines.on_start = lambda *args: None
    picker = GatewayPicker(engines, 3, np.random.default_rng(0))
    for e in range(3):
        engines.bring_up(e)
        picker.candidate[e] = True
    engines.enqueue(1, 0, 0.0)  # adapter 7 runs on engine 1
    picker.refresh(1)
    assert picker.pick(7) == 1  # active: 1.0
    engines.enqueue(0, 2, 0.0)
    engines.enqueue(0, 3, 0.0)  # engine 0: adapters 8 and 9 running, max_lora 2 reached
    picker.refresh(0)
    assert picker.pick(5) == 2  # engine 2: free slot (0.8) and empty queue, engine 0 scores 0
    engines.enqueue(2, 4, 0.0)
    engines.enqueue(2, 5, 0.0)
    engines.enqueue(2, 1, 0.0)  # engine 2 now runs 9 twice and queues one request of adapter 7
    picker.refresh(2)
    assert picker.pick(9) in (0, 2)  # active on both
    assert picker.pick(7) == 1  # active on 1 (1.0) beats waiting on 2 (0.6)


def test_the_command_writes_results_with_commit_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["fleet_sim", "--quick", "--alphas", "0.3", "--partition-factors", "1"])
    main(["--quick", "--alphas", "0.3", "--partition-factors", "1", "--duration", "12", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "fleet_sim.json").read_text())
    assert len(payload["environment"]["commit"]) == 40
    assert payload["environment"]["command"].startswith("python -m lorafleet.bench.fleet_sim --quick")
    assert {row["policy"] for row in payload["rows"]} == {"affinity", "hash", "gateway-lora-affinity"}
    assert "| 0.3 | affinity P=40 |" in (tmp_path / "fleet_sim.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "fleet_sim_series_alpha0.3.png").stat().st_size > 0
    assert (tmp_path / "fleet_sim_summary.png").stat().st_size > 0
    (tmp_path / "fleet_sim.md").unlink()
    main(["--replot", "--out", str(tmp_path)])  # the markdown again from the JSON alone
    assert "| 0.3 | affinity P=40 |" in (tmp_path / "fleet_sim.md").read_text()


def test_routing_cost_loads_a_revision_of_the_routing_module_and_replays_its_cache():
    from lorafleet.bench.fleet_routing_cost import load_revision, ranking_cache_size, replay_miss_rate
    from lorafleet.ingest import routing
    from lorafleet.ingest.routing import choose_partition

    try:
        head = load_revision("HEAD")
        before = load_revision("e617845")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history (a shallow clone or an export lacks it)")
    expected = choose_partition("request-1", "adapter-3", 1000, 2)
    assert head.choose_partition("request-1", "adapter-3", 1000, 2) == expected
    assert ranking_cache_size(head) == ranking_cache_size(routing)
    assert ranking_cache_size(before) == 8192  # the ranking cache before the fleet study
    assert replay_miss_rate([1, 2, 1, 2, 1, 2, 1, 2], 2) == 0.0
    assert replay_miss_rate([1, 2, 3, 1, 2, 3, 1, 2, 3, 1], 2) == 1.0  # LRU of 2 over a cycle of 3


def test_a_sticky_group_moves_only_the_partitions_of_the_engine_that_left():
    group = ConsumerGroup(12, np.random.default_rng(0), assignor="sticky")
    for engine in range(4):
        group.join(engine)
    before = group.owners()
    group.leave(1)
    after = group.owners()
    assert [p for p in range(12) if before[p] != after[p]] == [p for p in range(12) if before[p] == 1]
    assert sorted(after.count(e) for e in (0, 2, 3)) == [4, 4, 4]


def test_round_robin_moves_far_more_partitions_per_rebalance_than_sticky():
    setup = replace(SMALL, events=(FleetEvent(5.0, "fail", 3), FleetEvent(11.0, "join", 2)))
    trace = generate_fleet_trace(setup, 1.0)
    round_robin = FleetRun(setup, trace, "affinity", 48).run()["partitions_moved"]
    sticky = FleetRun(setup, trace, "affinity", 48, assignor="sticky").run()["partitions_moved"]
    assert len(round_robin) == len(sticky) == 2  # the failure found, the join
    assert sticky[0] == 3 * 3 / 48  # only the 3 dead engines' partitions (3 each) move
    assert sum(sticky) < sum(round_robin)


def test_the_sticky_assignor_runs_through_failures_and_joins():
    trace = generate_fleet_trace(SMALL, 0.3)
    row = FleetRun(SMALL, trace, "affinity", 16, assignor="sticky").run()
    assert row["served_once"] and row["assignor"] == "sticky"
