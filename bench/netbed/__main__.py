"""Start, inspect and tear down the multi-host test bed (scripts/netbed.sh calls this).

    python -m lorafleet.bench.netbed up [--workdir DIR] [--engines 3] [--partitions 6]
        builds the demo model and adapters (nothing downloaded), starts every service on its own
        host, prints the bed as JSON (addresses, Kafka bootstrap, Redis URL, topics) and writes it
        to DIR/bed.json, then holds it until Ctrl-C / SIGTERM and removes all of it
    python -m lorafleet.bench.netbed down [--all]
        removes the beds whose owner is gone (a crashed or killed run's); --all: every bed
    python -m lorafleet.bench.netbed status   lists the beds and whether their owner still runs
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

from lorafleet.bench.netbed.fleet import NetFleet, NetFleetSetup
from lorafleet.bench.netbed.network import STATE_DIR, bed_ids, sweep_stale, unavailable_reason


def up(args: argparse.Namespace) -> int:
    from lorafleet.common import settings
    from lorafleet.demo.assets import ensure_demo_assets

    assets = ensure_demo_assets(Path(settings.read("CACHE_DIR")).expanduser())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lorafleet-netbed-"))
    setup = NetFleetSetup(model=assets.model_dir, adapters={a: assets.adapter_dir(a) for a in assets.adapter_ids},
                       engines=args.engines, partitions=args.partitions)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    fleet = NetFleet(setup, workdir)
    try:
        fleet.start()
        described = {**fleet.bed.describe(), "kafka_bootstrap": fleet.kafka_bootstrap, "redis_url": fleet.redis_url,
                     "topics": fleet.topics, "adapters": list(setup.adapters), "workdir": str(workdir)}
        (workdir / "bed.json").write_text(json.dumps(described, indent=2))
        print(json.dumps(described, indent=2), flush=True)
        stop.wait()
    finally:
        fleet.stop()
    return 0


def status(_: argparse.Namespace) -> int:
    for bed_id in sorted(bed_ids()):
        state_file = STATE_DIR / f"{bed_id}.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        print(json.dumps({"bed": bed_id, **state}))
    return 0


def down(args: argparse.Namespace) -> int:
    removed = sweep_stale(everything=args.all)
    print(f"removed {len(removed)} bed(s): {' '.join(removed)}" if removed else "no bed to remove")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet.bench.netbed", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a bed and hold it until Ctrl-C")
    start.add_argument("--workdir", help="logs, ready files and bed.json (default: a new temporary folder)")
    start.add_argument("--engines", type=int, default=3)
    start.add_argument("--partitions", type=int, default=6)
    remove = commands.add_parser("down", help="remove the beds whose owner is gone")
    remove.add_argument("--all", action="store_true", help="also the beds of runs still going")
    commands.add_parser("status", help="list the beds on this machine")
    args = parser.parse_args(argv)
    if args.command == "up" and (reason := unavailable_reason()):
        print(f"cannot make a test bed here: {reason}", file=sys.stderr)
        return 2
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
