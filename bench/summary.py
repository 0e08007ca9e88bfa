"""One table per setting from every result file of a folder (engine runs, roofline, merged models,
HF PEFT, end to end), issue 5's targets marked pass or miss, and plots (throughput against n,
first-token latency percentiles). Reads only the JSON, so it runs anywhere after the GPU runs.

    python -m lorafleet.bench.summary --dir bench/results/h200 --settings S1 S2 S4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafleet.bench.report import plot_records, pyplot

PREFIXES = ("engine", "merged", "hf-peft", "e2e")  # files <prefix>-<setting>.json
COLUMNS = ("mode", "n", "req/s", "tok/s", "vs base-only", "vs roofline", "TTFT mean", "p50", "p90", "p99",
           "SLO 6 s", "KV GB", "adapters GB", "loads / evictions / preemptions")


def load(folders: list[Path], setting: str) -> tuple[list[dict], list[dict]]:
    """(records, environments) of every result file of `setting` in `folders` (the first is the
    summary's own folder: its files are named plainly, the others' by their path)."""
    records, envs = [], []
    for i, folder in enumerate(folders):
        for prefix in PREFIXES:
            path = folder / f"{prefix}-{setting}.json"
            if path.exists():
                payload = json.loads(path.read_text())
                envs.append({"file": path.name if i == 0 else str(path), **payload["environment"]})
                records += payload["records"]
    return records, envs


def _find(records: list[dict], mode: str, n: int | None = None) -> dict | None:
    for r in records:
        if r["mode"] == mode and (n is None or r["n"] == n) and "throughput_req_s" in r:
            return r
    return None


def _pct(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.0%}"


def _row(r: dict, base: dict | None, roof: dict | None) -> str:
    def f(key: str, fmt: str) -> str:
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    if "error" in r:
        return f"| {r['mode']} | {r['n']} | failed: {r['error'][:200]} |" + " |" * (len(COLUMNS) - 3)
    if r.get("fits") is False:
        return f"| {r['mode']} | {r['n']} | does not fit: {r['reason']} |" + " |" * (len(COLUMNS) - 3)
    counters = " / ".join(str(r.get(k, "-")) for k in ("adapter_loads", "adapter_evictions", "preemptions"))
    # A run that served part of what it was offered (HF PEFT within its time budget) says so: its
    # latencies and SLO count only the requests it served.
    mode = r["mode"] if "offered" not in r else f"{r['mode']} ({r.get('served', 0)} of {r['offered']} served)"
    cells = [mode, str(r["n"]), f("throughput_req_s", "{:.2f}"), f("throughput_tok_s", "{:.0f}"),
             _pct(r.get("throughput_req_s"), base and base["throughput_req_s"]),
             _pct(r.get("throughput_req_s"), roof and roof["throughput_req_s"]),
             f("ttft_mean_s", "{:.2f}"), f("ttft_p50_s", "{:.2f}"), f("ttft_p90_s", "{:.2f}"), f("ttft_p99_s", "{:.2f}"),
             f("slo_6s", "{:.1%}"), f("peak_kv_gb", "{:.1f}"), f("peak_adapter_gb", "{:.2f}"),
             counters if "adapter_loads" in r else "-"]
    return "| " + " | ".join(cells) + " |"


def targets(by_setting: dict[str, list[dict]]) -> list[str]:
    """Issue 5's targets (one H200, S1): each line says pass or miss with the measured ratio."""
    s1, s2 = by_setting.get("S1", []), by_setting.get("S2", [])
    out = []

    def line(what: str, value: float | None, goal: float, shown: str) -> None:
        verdict = "not measured" if value is None else ("**pass**" if value >= goal else "**miss**")
        out.append(f"- {what}: {shown if value is not None else '-'} ({verdict})")

    n2000, base = _find(s1, "lora", 2000), _find(s1, "base-only")
    n5, n10000 = _find(s1, "lora", 5), _find(s1, "lora", 10000)
    v = n2000 and n2000["throughput_req_s"]
    line("S1 n = 2000 at 30 req/s or more", v and v / 30, 1.0, f"{v:.2f} req/s, {v / 30:.0%} of 30" if v else "")
    ratio = n2000 and base and n2000["throughput_req_s"] / base["throughput_req_s"]
    line("S1 n = 2000 within 10% of base-only", ratio, 0.9, f"{ratio:.0%} of base-only" if ratio else "")
    ratio = n10000 and n5 and n10000["throughput_req_s"] / n5["throughput_req_s"]
    line("S1 n = 10000 within 10% of n = 5", ratio, 0.9, f"{ratio:.0%} of n = 5" if ratio else "")
    for n in sorted({r["n"] for r in s2 if r["mode"] == "lora"}):
        a, b = _find(s2, "lora", n), _find(s1, "lora", n)
        ratio = a and b and a["throughput_req_s"] / b["throughput_req_s"]
        line(f"S2 within 15% of S1 at n = {n}", ratio, 0.85, f"{ratio:.0%} of S1" if ratio else "")
    return out


def table(setting: str, records: list[dict], envs: list[dict]) -> list[str]:
    base = _find(records, "base-only")
    lines = [f"## {setting}", ""]
    for e in envs:
        lines.append(f"- `{e['file']}`: commit `{e['commit'][:12]}`, {e['gpu']}, {e['date']}: `{e['command']}`")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {"lora": 0, "base-only": 1, "e2e": 2, "merged": 3, "hf-peft": 4, "roofline": 5, "roofline-base": 6}
    for r in sorted(records, key=lambda r: (order.get(r["mode"], 9), r["n"])):
        roof = _find(records, "roofline" if r["n"] else "roofline-base", r["n"])
        lines.append(_row(r, base, None if r["mode"].startswith("roofline") else roof))
    return lines + [""]


def plot_ttft(path: Path, setting: str, records: list[dict]) -> None:
    plt = pyplot()
    runs = sorted((r for r in records if r["mode"] in ("lora", "e2e") and "ttft_p50_s" in r), key=lambda r: r["n"])
    if plt is None or not runs:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("lora", "o"), ("e2e", "s")):
        for q, ls in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            pts = [(r["n"], r[f"ttft_{q}_s"]) for r in runs if r["mode"] == mode]
            if pts:
                ax.plot(*zip(*pts), marker=marker, ls=ls, label=f"{mode} {q}")
    ax.axhline(6.0, color="red", lw=0.8, label="SLO 6 s")
    ax.set_xscale("log")
    ax.set_xlabel("adapters (n)")
    ax.set_ylabel("first-token latency (s)")
    ax.set_title(f"{setting}: first-token latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench/results/h200"))
    p.add_argument("--settings", nargs="+", default=["S1", "S2", "S4"])
    p.add_argument("--also", type=Path, nargs="*", default=[],
                   help="more folders whose result files join the tables (e.g. another call's baselines)")
    args = p.parse_args()
    by_setting, sections = {}, []
    for s in args.settings:
        records, envs = load([args.dir, *args.also], s)
        if not records:
            continue
        by_setting[s] = records
        sections += table(s, records, envs)
        plot_records(args.dir / f"throughput-{s}.png", f"{s}: throughput", records)
        plot_ttft(args.dir / f"ttft-{s}.png", s, records)
    text = ["# S-LoRA benchmark summary", "", "Columns: throughput over first arrival to last completion; "
            "`vs roofline` = measured / the roofline bound of the same trace (bench/roofline.py); TTFT in "
            "seconds; KV and adapter memory at their peak in the unified pool.", "", "## Targets (issue 5)", "",
            *targets(by_setting), "", *sections]
    (args.dir / "SUMMARY.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
