"""The bed itself: hosts reach each other by address, its faults drop what they should and only
that, and nothing it made outlives it, even when its owner is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.bench.netbed.network import PREFIX, STATE_DIR, NetBed, ip, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")
CONNECT = "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], 7000), timeout=1.5).close(); print('ok')\n" \
          "except OSError as e: print('unreachable', e)"


def _reach(bed: NetBed, src: str, dst_address: str) -> bool:
    out = subprocess.run(bed.argv(src, [sys.executable, "-c", CONNECT, dst_address]), check=False,
                         capture_output=True, text=True, timeout=30).stdout
    return out.startswith("ok")


def _leftovers(bed_id: str) -> list[str]:
    namespaces = [n for n in ip("netns", "list").stdout.split() if n.startswith(f"{PREFIX}-{bed_id}-")]
    links = [n for n in ip("-br", "link").stdout.split() if n.startswith(f"{PREFIX}{bed_id}")]
    return namespaces + links + ([str(STATE_DIR / f"{bed_id}.json")] if (STATE_DIR / f"{bed_id}.json").exists() else [])


def test_hosts_reach_each_other_and_faults_drop_only_what_they_name():
    bed = NetBed.create(["a", "b", "c"])
    try:
        serve = "import socket,sys\ns=socket.create_server((sys.argv[1], 7000))\nwhile True: s.accept()[0].close()"
        servers = [subprocess.Popen(bed.argv(h, [sys.executable, "-c", serve, bed.hosts[h].address])) for h in ("b", "c")]
        b, c = bed.hosts["b"].address, bed.hosts["c"].address
        deadline = time.monotonic() + 30
        while not (_reach(bed, "a", b) and _reach(bed, "a", c)):
            assert time.monotonic() < deadline, "servers never listened"
        with socket.create_connection((b, 7000), timeout=2):  # the runner reaches the bed too
            pass
        bed.isolate("a", "b")
        assert not _reach(bed, "a", b) and _reach(bed, "a", c) and _reach(bed, "c", b)
        bed.heal("a", "b")
        assert _reach(bed, "a", b)
        bed.cut("b")
        assert not _reach(bed, "a", b) and not _reach(bed, "c", b) and _reach(bed, "a", c)
        bed.reconnect("b")
        assert _reach(bed, "a", b)
        for server in servers:
            server.kill()
    finally:
        bed.teardown()
    assert _leftovers(bed.bed_id) == []


def test_a_killed_owner_leaves_nothing_after_netbed_down():
    owner = subprocess.Popen([sys.executable, "-c", (
        "import subprocess,sys,time\nfrom lorafleet.bench.netbed.network import NetBed\n"
        "bed = NetBed.create(['x', 'y'])\n"
        "subprocess.Popen(bed.argv('x', ['sleep', '600']))\n"
        "print(bed.bed_id, flush=True)\ntime.sleep(600)")], stdout=subprocess.PIPE, text=True)
    bed_id = owner.stdout.readline().strip()
    assert bed_id and _leftovers(bed_id), "the owner made no bed"
    sleeper = ip("netns", "pids", f"{PREFIX}-{bed_id}-x").stdout.split()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    down = subprocess.run(["bash", "scripts/netbed.sh", "down"], check=False, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert down.returncode == 0 and bed_id in down.stdout, down.stdout + down.stderr
    assert _leftovers(bed_id) == []
    for pid in sleeper:  # what ran in its namespaces is gone with them
        stat = f"/proc/{pid}/stat"
        assert not os.path.exists(stat) or Path(stat).read_text().split()[2] == "Z"
