"""Adapter affinity across hosts, measured on the multi-host bed (bench/netbed): ingest's routing
(LORAFLEET_INGEST_ROUTING=affinity) against plain hashing of the request id (=hash), under skewed
and uniform adapter popularity, in one run.

Each (popularity, policy) pair gets a fresh bed (empty caches) and the same open-loop trace
(bench/workload.generate_trace: power-law popularity, `alpha` 1 = uniform, smaller = more skewed;
Poisson arrivals) at a rate near the bed's capacity, which the run measures first: a burst of
requests on a bed of its own, capacity = requests / seconds to serve them all, under hashing (it
loads adapters most). Engines hold few adapters in their pool (`adapter_slots`), so a request
whose engine does not hold its adapter costs a load. Figures per pair:

    hit rate           1 - adapter loads / adapter requests (loads: the engines' own counter,
                       lorafleet_engine_adapter_loads_total, prefetches included)
    loads / request    adapter loads per adapter request
    engine-adapter     distinct (engine, adapter) pairs served ("request done" log lines)
    throughput         tokens / second from the first arrival to the last terminal entry: of the
                       trace (it follows the arrivals while the bed keeps up) and of a burst of
                       `burst` requests sent at once before it (the policy's saturated throughput)
    latency            p50 / p99 of arrival -> terminal entry and of arrival -> first token
                       (arrival: the trace's time; the replay is bench/e2e_bench.drive and the
                       figures bench/metrics.summarize, as for the single-host end-to-end bench)

    python -m lorafleet.bench.netbed.affinity_bench            # writes bench/results/netbed-affinity/
    python -m lorafleet.bench.netbed.affinity_bench --quick    # a short run (smoke, not a result)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.bench.e2e_bench import drive
from lorafleet.bench.netbed.fleet import NetFleet, NetFleetSetup
from lorafleet.bench.netbed.results import RESULTS, render, write_results
from lorafleet.bench.workload import TraceRequest, generate_trace

POLICIES = ("affinity", "hash")
TIMEOUT_S = 600.0  # a replay still open this long after its start fails the run


@dataclass(frozen=True)
class AffinityBenchSetup:
    adapters: int = 48
    engines: int = 3
    partitions: int = 6
    adapter_slots: int = 4  # adapters an engine's pool holds at once (--max-adapter-slots)
    duration_s: float = 120.0
    load: float = 0.8  # arrival rate / measured capacity
    alphas: tuple[float, ...] = (0.3, 1.0)
    input_range: tuple[int, int] = (8, 24)
    output_range: tuple[int, int] = (16, 48)
    burst: int = 240  # requests of the capacity measurement
    seed: int = 7


def build_assets(folder: Path, n_adapters: int) -> tuple[Path, dict[str, Path]]:
    """The zoo's "mha" model and four adapters of different ranks and modules, each under
    n_adapters / 4 ids (an id is what the engines cache and load)."""
    from lorafleet.demo.tiny_models import build_peft_adapter, build_tiny_model

    model = folder / "model"
    build_tiny_model(model, arch="llama", hidden_size=64, num_heads=4, num_kv_heads=4, seed=1)
    kinds = [{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
             {"r": 16, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
             {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
             {"r": 32, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}]
    sources = []
    for i, kind in enumerate(kinds):
        sources.append(folder / f"kind{i}")
        build_peft_adapter(model, sources[-1], seed=20 + i, **kind)
    return model, {f"bench/a{i}": sources[i % len(sources)] for i in range(n_adapters)}  # drive's ids


def _prompts(trace: list[TraceRequest]) -> list[list[int]]:
    return [[(13 * r.index + 7 * j) % 500 + 4 for j in range(r.input_len)] for r in trace]


def replay(fleet: NetFleet, trace: list[TraceRequest], run: str) -> dict:
    """The trace open loop through the bed (bench/e2e_bench.drive); its summary (bench/metrics)."""
    ready = {"kafka_bootstrap": fleet.kafka_bootstrap, "redis_url": fleet.redis_url,
             "requests_topic": fleet.topics["requests"]}
    return asyncio.run(drive(ready, trace, _prompts(trace), run, adapter_prefix="", timeout_s=TIMEOUT_S))


def engine_counter(fleet: NetFleet, engine: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    port = json.loads((fleet.workdir / f"{engine}.ready").read_text())["metrics_port"]
    with urllib.request.urlopen(f"http://{fleet.address(engine)}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name)


def _fleet(setup: AffinityBenchSetup, model: Path, adapters: dict[str, Path], policy: str, workdir: Path) -> NetFleet:
    fleet_setup = NetFleetSetup(model=model, adapters=adapters, engines=setup.engines, partitions=setup.partitions,
                                engine_flags=("--pool-pages", "256", "--max-batched-tokens", "256",
                                              "--max-adapter-slots", str(setup.adapter_slots), "--max-adapter-rank", "32"),
                                env={"LORAFLEET_INGEST_ROUTING": policy})
    return NetFleet(fleet_setup, workdir).start()


def _burst(setup: AffinityBenchSetup, alpha: float) -> list[TraceRequest]:
    """`burst` requests arriving within a quarter of a second: a backlog at once."""
    return generate_trace(setup.adapters, alpha, 1000.0, 1.0, setup.burst / 1000.0, setup.input_range,
                          setup.output_range, seed=setup.seed + 1)


def measure_capacity(setup: AffinityBenchSetup, model: Path, adapters: dict[str, Path], workdir: Path) -> float:
    """Requests per second the bed serves with a backlog: a burst under hashing."""
    fleet = _fleet(setup, model, adapters, "hash", workdir / "capacity")
    try:
        return replay(fleet, _burst(setup, 1.0), "burst")["throughput_req_s"]
    finally:
        fleet.stop()


def _loads(fleet: NetFleet) -> float:
    return sum(engine_counter(fleet, e, "lorafleet_engine_adapter_loads_total") for e in fleet.setup.engine_names)


def measure(setup: AffinityBenchSetup, model: Path, adapters: dict[str, Path], alpha: float, policy: str,
            rate: float, workdir: Path) -> dict:
    """One fresh bed: first a burst (all at once: the policy's saturated throughput), then, once
    it is served, the open-loop trace (hits, loads and latency near capacity)."""
    run = f"{policy}-{alpha}"
    trace = generate_trace(setup.adapters, alpha, rate, 1.0, setup.duration_s, setup.input_range,
                           setup.output_range, seed=setup.seed)
    fleet = _fleet(setup, model, adapters, policy, workdir / run)
    try:
        saturated = replay(fleet, _burst(setup, alpha), f"b{run}")
        loads_before = _loads(fleet)
        served = replay(fleet, trace, f"t{run}")
        loads = _loads(fleet) - loads_before
        pairs = {(e, d["adapter_id"]) for e in fleet.setup.engine_names for d in fleet.events(e, "request done")
                 if d["request_id"].startswith(f"t{run}-")}
    finally:
        fleet.stop()
    return {"alpha": alpha, "policy": policy, "rate_rps": rate, "requests": len(trace), "done": served["requests"],
            "adapter_loads": int(loads), "hit_rate": 1 - loads / len(trace), "loads_per_request": loads / len(trace),
            "engine_adapter_pairs": len(pairs), "tokens_per_s": served["throughput_tok_s"],
            "saturated_tokens_per_s": saturated["throughput_tok_s"],
            "saturated_requests_per_s": saturated["throughput_req_s"],
            **{k: served[k] for k in ("e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "ttft_p99_s")}}


def run(setup: AffinityBenchSetup, workdir: Path) -> dict:
    model, adapters = build_assets(workdir / "assets", setup.adapters)
    capacity = measure_capacity(setup, model, adapters, workdir)
    rate = round(setup.load * capacity, 2)
    rows = [measure(setup, model, adapters, alpha, policy, rate, workdir) for alpha in setup.alphas
            for policy in POLICIES]
    return {"setup": asdict(setup), "capacity_rps": capacity, "rate_rps": rate, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s traces, a small burst (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/netbed-affinity)")
    parser.add_argument("--workdir", type=Path, default=None, help="logs of every bed (default: a temporary folder)")
    parser.add_argument("--load", type=float, default=AffinityBenchSetup.load, help="arrival rate / measured capacity")
    parser.add_argument("--replot", action="store_true", help="only redraw the markdown and PNG from --out's JSON")
    args = parser.parse_args()
    if args.replot:
        print(render(args.out or RESULTS))
        return
    setup = AffinityBenchSetup(load=args.load, **({"duration_s": 20.0, "burst": 60} if args.quick else {}))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorafleet-affinity-"))
    results = run(setup, workdir)
    print(write_results(results, args.out))


if __name__ == "__main__":
    main()
