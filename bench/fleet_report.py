"""The fleet simulation's results on disk: fleet_sim.json (every figure and time series, with the
commit, machine and command), fleet_sim.md (the tables), PNG plots (matplotlib Agg, skipped
where matplotlib is missing)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lorafleet.bench.fleet_setup import EngineModel, FleetEvent, FleetSetup
from lorafleet.bench.report import ROOT, environment, pyplot

RESULTS = ROOT / "bench" / "results" / "fleet-sim"
COLORS = {"affinity": "tab:blue", "hash": "tab:gray", "gateway-lora-affinity": "tab:orange", "sticky": "tab:green",
          "hot": "tab:purple"}


def _color_key(row: dict) -> str:
    if row.get("hot_variant"):
        return "hot"
    return "sticky" if row.get("assignor") == "sticky" else row["policy"]


def _late_loads(row: dict, duration_s: float) -> float:
    """Adapter loads/s over the last 10 s of arrivals: caches warm, the last event 10 s or more ago."""
    series = row["series"]
    late = [x for t, x in zip(series["t_s"], series["adapter_loads_per_s"]) if duration_s - 10 < t < duration_s]
    return sum(late) / len(late) if late else 0.0


def _moved(row: dict) -> str:
    moved = row.get("partitions_moved")
    return "-" if not moved else ", ".join(f"{m:.0%}" for m in moved)


def label(row: dict) -> str:
    if row["partitions"] is None:
        return row["policy"]
    sticky = " sticky" if row.get("assignor") == "sticky" else ""
    hot = f" hot {row['hot_adapter_rps']:g}/s" if row.get("hot_variant") else ""
    return f"{row['policy']} P={row['partitions']}{sticky}{hot}"


def write_results(setup: FleetSetup, rows: list[dict], out, wall_s: float) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(module="lorafleet.bench.fleet_sim"), "setup": asdict(setup), "rate_rps": setup.rate_rps,
               "engine_capacity_rps": setup.engine.capacity_rps(setup.mean_output), "wall_s": wall_s, "rows": rows}
    (out / "fleet_sim.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "fleet_sim.md").write_text(markdown(payload))
    plot_series(out, setup, rows)
    plot_summary(out / "fleet_sim_summary.png", rows)
    return out


def rewrite(out) -> None:
    """The markdown and plots again from fleet_sim.json (any machine, no simulation)."""
    out = Path(out)
    payload = json.loads((out / "fleet_sim.json").read_text())
    raw = dict(payload["setup"])
    setup = FleetSetup(**{**raw, "engine": EngineModel(**raw["engine"]), "output_range": tuple(raw["output_range"]),
                          "events": tuple(FleetEvent(**e) for e in raw["events"])})
    (out / "fleet_sim.md").write_text(markdown(payload))
    plot_series(out, setup, payload["rows"])
    plot_summary(out / "fleet_sim_summary.png", payload["rows"])


def markdown(payload: dict) -> str:
    env, s, e = payload["environment"], payload["setup"], payload["setup"]["engine"]
    events = ", ".join(f"{ev['engines']} engines {ev['kind']} at {ev['at_s']:.0f} s" for ev in s["events"])
    lines = [
        "# Routing at fleet scale (simulation)", "",
        (f"commit `{env['commit']}`, {env['machine']}, {env['cpu_count']} CPUs, Python {env['python']}, "
         f"{env['date']}; {payload['wall_s']:.0f} s of wall time"), "", f"command: `{env['command']}`", "",
        (f"Setup: {s['engines']} engines, {s['adapters']:,} adapters, {s['duration_s']:.0f} s of arrivals at "
        f"{payload['rate_rps']:,.0f} requests/s ({s['load']:.0%} of the starting capacity; Gamma cv {s['cv']}, "
        f"+-{s['wave_amplitude']:.0%} wave over {s['wave_period_s']:.0f} s); outputs uniform in "
        f"[{s['output_range'][0]}, {s['output_range'][1]}) tokens. Engine: {e['max_running']} running requests, "
        f"{e['adapter_slots']} adapter slots (LRU), {e['decode_step_s'] * 1000:.0f} ms per output token, "
        f"{e['adapter_load_s'] * 1000:.0f} ms per adapter load: {payload['engine_capacity_rps']:.1f} requests/s. "
        f"Events: {events}; session timeout {s['session_timeout_s']:.0f} s, rebalance {s['rebalance_s']:.0f} s "
        f"(in-flight requests restarted: {s['restart_on_rebalance']}). Router: hot spread above "
        f"{s['hot_adapter_rps']:.0f} requests/s per partition over {s['hot_window_s']:.0f} s. alpha: "
        "S-LoRA's popularity exponent (1 uniform, smaller more skewed)."), "",
        ("hit: served by an engine already holding the adapter; loads/s: adapter loads per second of "
        "arrivals (over the run, from cold caches; over its last 10 s); steady: arrivals from half the time "
        "to the first event until the longest request's service time before it; imbalance: busiest "
        "engine's started requests over the mean per "
        f"{s['imbalance_window_s']:.0f} s window (mean of windows / worst window) and over the run; "
        "delay: arrival to (last) start; adapters / engine, / node: distinct adapters an engine (up all run) "
        f"and a node of {s['engines_per_node']} engines ran; routing: time in the policy's call per request "
        "on this machine, including each adapter's first ranking in this process (the runs share one process "
        "and its 2^17-entry ranking cache, so a run after one at another partition count ranks again: "
        "routing_cost.md has the steady cost)."), "",
        ("| alpha | policy | requests | hit | steady hit | loads/s: run, last 10 s | imbalance win mean / max / run "
         "| delay p50 / p99 s | steady p99 s | restarted | partitions moved per rebalance | served once "
         "| adapters / engine, / node | routing us/req |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['alpha']} | {label(r)} | {r['requests']:,} | {r['hit_rate']:.1%} | {r['steady_hit_rate']:.1%} "
            f"| {r['adapter_loads_per_s']:,.0f}, {_late_loads(r, s['duration_s']):,.0f} "
            f"| {r['imbalance_window_mean']:.2f} / {r['imbalance_window_max']:.2f} / "
            f"{r['imbalance_overall']:.2f} | {r['queue_delay_p50_s']:.2f} / {r['queue_delay_p99_s']:.2f} "
            f"| {r['steady_delay_p99_s']:.2f} | {r['restarted_attempts']:,} | {_moved(r)} | {r['served_once']} "
            f"| {r['adapters_per_engine']:,.0f}, {r['adapters_per_node']:,.0f} | {r['routing_us_per_request']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_series(out: Path, setup: FleetSetup, rows: list[dict]) -> None:
    """Per popularity: hit rate, adapter loads/s and mean queueing delay over time, events marked."""
    plt = pyplot()
    if plt is None:
        return
    for alpha in sorted({r["alpha"] for r in rows}):
        fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
        for r in (r for r in rows if r["alpha"] == alpha):
            style = "-" if r["partitions"] in (None, setup.engines) else ":"
            style = "--" if r.get("assignor") == "sticky" else style
            style = "-." if r.get("hot_variant") else style
            s = r["series"]
            for ax, key in zip(axes, ("hit_rate", "adapter_loads_per_s", "delay_mean_s")):
                ax.plot(s["t_s"], np.array(s[key], dtype=float), style, color=COLORS.get(_color_key(r)),
                        label=label(r), linewidth=1.2)
        for ax, name in zip(axes, ("hit rate", "adapter loads / s", "mean queueing delay (s, by arrival)")):
            ax.set_ylabel(name)
            for event in setup.events:
                ax.axvline(event.at_s, color="red" if event.kind == "fail" else "green", alpha=0.4)
                ax.axvline(event.at_s + (setup.session_timeout_s if event.kind == "fail" else 0), color="black",
                           alpha=0.15, linestyle="--")
        axes[0].set_title(f"{setup.engines} engines, {setup.adapters:,} adapters, alpha {alpha}\n"
                          "red: engines fail, green: engines join, dashed: the group rebalances", fontsize=10)
        axes[0].legend(fontsize=7)
        axes[-1].set_xlabel("simulated time (s)")
        fig.tight_layout()
        fig.savefig(out / f"fleet_sim_series_alpha{alpha}.png", dpi=110)
        plt.close(fig)


def plot_summary(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    names = [f"a={r['alpha']} {label(r)}" for r in rows]
    colors = [COLORS.get(_color_key(r)) for r in rows]
    for ax, key, title in zip(axes, ("hit_rate", "adapter_loads_per_s", "imbalance_window_mean"),
                              ("hit rate", "adapter loads / s", "busiest / mean engine (10 s windows)")):
        ax.barh(names, [r[key] for r in rows], color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
