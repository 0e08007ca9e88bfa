"""What the ingest's routing costs per request at fleet scale, for revisions of its routing module.

Each revision's services/ingest/routing.py (`git show REV:...`) is loaded as a module and timed
on this machine:

    cold_us   ranking one adapter not seen before (every partition hashed; mean of 200 adapters)
    warm_us   Router.route of an adapter whose ranking is cached (mean of 20,000 calls)
    miss      the revision's own ranking cache (its functools.lru_cache maxsize) replayed over the
              fleet trace's adapters in arrival order, counted over the second half (warm)
    steady_us miss * cold_us + (1 - miss) * warm_us: what a long-running ingest pays per request

The replay treats every request as spread <= the cached depth (hot adapters spread wider hit a
separate small cache in the new revision and are few), so it slightly favours the old revision.

    python -m lorafleet.bench.fleet_routing_cost --revisions e617845 HEAD --partitions 1000 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

from lorafleet.bench.fleet_report import RESULTS
from lorafleet.bench.fleet_setup import FleetSetup, generate_fleet_trace
from lorafleet.bench.report import ROOT, environment

ROUTING = "services/ingest/routing.py"


def load_revision(revision: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{ROUTING}"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"routing_{revision}")
    exec(compile(source, f"{revision}:{ROUTING}", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def resolve(revision: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision], capture_output=True,
                          text=True, check=True).stdout.strip()


def ranking_cache_size(routing: types.ModuleType) -> int:
    cached = getattr(routing, "_top_partitions", None) or routing._ranked_partitions
    return cached.cache_parameters()["maxsize"]


def replay_miss_rate(adapters: list[int], maxsize: int) -> float:
    @lru_cache(maxsize=maxsize)
    def seen(adapter: int) -> None:
        return None

    half = len(adapters) // 2
    for a in adapters[:half]:
        seen(a)
    before = seen.cache_info().misses
    for a in adapters[half:]:
        seen(a)
    return (seen.cache_info().misses - before) / (len(adapters) - half)


def measure(routing: types.ModuleType, n_partitions: int, adapters: list[int]) -> dict:
    started = time.perf_counter()
    for i in range(200):
        routing.candidate_partitions(f"cold-{n_partitions}-{i}", n_partitions, 1)
    cold_us = (time.perf_counter() - started) / 200 * 1e6
    router = routing.Router(n_partitions, 20.0, 10.0, clock=time.monotonic)
    names = [f"adapter-{a}" for a in range(50)]
    for name in names:
        router.route("warm-up", name)
    started = time.perf_counter()
    for i in range(20_000):
        router.route(f"request-{i}", names[i % 50])
    warm_us = (time.perf_counter() - started) / 20_000 * 1e6
    maxsize = ranking_cache_size(routing)
    miss = replay_miss_rate(adapters, maxsize)
    return {"partitions": n_partitions, "cache_entries": maxsize, "cold_us": cold_us, "warm_us": warm_us,
            "miss_rate": miss, "steady_us": miss * cold_us + (1 - miss) * warm_us}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--revisions", nargs="+", default=["e617845", "HEAD"])
    p.add_argument("--partitions", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    setup = FleetSetup()
    rows = []
    for alpha in args.alphas:
        adapters = generate_fleet_trace(setup, alpha).adapter.tolist()
        for revision in args.revisions:
            routing = load_revision(revision)
            for n_partitions in args.partitions:
                row = {"revision": resolve(revision), "alpha": alpha, **measure(routing, n_partitions, adapters)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(module="lorafleet.bench.fleet_routing_cost")
    (out / "routing_cost.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = ["# The ingest's routing cost per request at fleet scale", "",
             f"commit `{env['commit']}`, {env['machine']}, {env['cpu_count']} CPUs, {env['date']}", "",
             f"command: `{env['command']}`", "",
             ("| revision | alpha | partitions | cache entries | cold ranking us | warm route us | warm miss rate "
              "| steady us/request |"), "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['revision']} | {r['alpha']} | {r['partitions']} | {r['cache_entries']:,} | {r['cold_us']:.0f} "
              f"| {r['warm_us']:.1f} | {r['miss_rate']:.1%} | {r['steady_us']:.1f} |" for r in rows]
    (out / "routing_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
