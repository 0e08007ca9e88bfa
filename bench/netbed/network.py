"""Hosts on one machine: network namespaces joined by veth pairs and a bridge (iproute2).

    switch namespace  lfnb-<bed>-sw : bridge "br0", one veth end per host ("v<i>")
    host namespaces   lfnb-<bed>-<host> : lo + "eth0" with 10.213.<n>.<10+i>/24
    the runner        the root namespace's "lfnb<bed>c" with 10.213.<n>.1/24 (tests and benchmarks
                      talk to the bed from here, to bed addresses only)

Nothing else on the machine is touched: the bridge lives in its own namespace, the only link in
the root namespace is the runner's veth, and its /24 is one no route of the machine covers.
Every name carries the bed's id, and a state file under STATE_DIR records the owner's pid, so
`sweep_stale()` removes what a crashed run left (namespaces, their processes, the runner's veth).

Faults are iproute2 only (this kernel has no netem, no tc classifiers, no netfilter):
    cut(host)            the host's switch port leaves the bridge: every packet to or from it is
                         dropped silently, as on a pulled cable; reconnect() puts it back
    isolate(a, b)        a and b route each other's address via the sink host, which does not
                         forward (net.ipv4.ip_forward = 0 in a new namespace) and so drops it
                         silently: a partition between two hosts only; heal(a, b) ends it
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIX = "lfnb"
STATE_DIR = Path("/run/lorafleet-netbed")
SUBNETS = ipaddress.ip_network("10.213.0.0/16")
SINK = "sink"


class NetBedUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no netns support)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why a bed cannot be made on this machine, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    ip("netns", "del", probe, check=False)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    address: str
    port: str  # its veth end in the switch namespace


class NetBed:
    """A bed's namespaces and addresses; `create` builds it, `teardown` removes all of it."""

    def __init__(self, bed_id: str, subnet: ipaddress.IPv4Network, hosts: dict[str, Host]) -> None:
        self.bed_id, self.subnet, self.hosts = bed_id, subnet, hosts
        self.switch = f"{PREFIX}-{bed_id}-sw"
        self.runner_link = f"{PREFIX}{bed_id}c"
        self.runner_address = str(subnet.network_address + 1)

    @classmethod
    def create(cls, names: list[str]) -> NetBed:
        reason = unavailable_reason()
        if reason:
            raise NetBedUnavailable(reason)
        sweep_stale()
        bed_id = secrets.token_hex(2)
        subnet = _free_subnet()
        hosts = {name: Host(name, f"{PREFIX}-{bed_id}-{name}", str(subnet.network_address + 10 + i), f"v{i}")
                 for i, name in enumerate([*names, SINK])}
        bed = cls(bed_id, subnet, hosts)
        bed._write_state()
        try:
            bed._build()
        except BaseException:
            bed.teardown()
            raise
        return bed

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts.values():
            ip("netns", "add", host.ns)
            ip("-n", host.ns, "link", "set", "lo", "up")
            ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            self._attach(host.port)
            ip("-n", host.ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
        ip("link", "add", self.runner_link, "type", "veth", "peer", "name", "vrun", "netns", self.switch)
        self._attach("vrun")
        ip("addr", "add", f"{self.runner_address}/{self.subnet.prefixlen}", "dev", self.runner_link)
        ip("link", "set", self.runner_link, "up")

    def _attach(self, port: str) -> None:
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].ns, *argv]

    def add_address(self, host: str, address: str, dev: str = "eth0") -> None:
        """A second address (an alias on eth0, or a /32 on lo that shadows a peer's address)."""
        prefix = self.subnet.prefixlen if dev == "eth0" else 32
        ip("-n", self.hosts[host].ns, "addr", "add", f"{address}/{prefix}", "dev", dev)

    def del_address(self, host: str, address: str, dev: str = "lo") -> None:
        prefix = self.subnet.prefixlen if dev == "eth0" else 32
        ip("-n", self.hosts[host].ns, "addr", "del", f"{address}/{prefix}", "dev", dev)

    def cut(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[host].port, "nomaster")

    def reconnect(self, host: str) -> None:
        self._attach(self.hosts[host].port)

    def isolate(self, a: str, b: str, *, to: str | None = None) -> None:
        """Silently drop a <-> b traffic (both directions); `to`: b's address to cut if not its own."""
        sink = self.hosts[SINK].address
        ip("-n", self.hosts[a].ns, "route", "replace", f"{to or self.hosts[b].address}/32", "via", sink)
        ip("-n", self.hosts[b].ns, "route", "replace", f"{self.hosts[a].address}/32", "via", sink)

    def heal(self, a: str, b: str, *, to: str | None = None) -> None:
        ip("-n", self.hosts[a].ns, "route", "del", f"{to or self.hosts[b].address}/32", check=False)
        ip("-n", self.hosts[b].ns, "route", "del", f"{self.hosts[a].address}/32", check=False)

    def teardown(self) -> None:
        """Kill every process in the bed's namespaces, delete them and the runner's veth."""
        _remove_bed(self.bed_id)

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "subnet": str(self.subnet), "hosts": {n: h.address for n, h in self.hosts.items()}}
        (STATE_DIR / f"{self.bed_id}.json").write_text(json.dumps(state))

    def describe(self) -> dict:
        return {"bed": self.bed_id, "subnet": str(self.subnet), "runner": self.runner_address,
                "hosts": {n: {"ns": h.ns, "address": h.address} for n, h in self.hosts.items()}}


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUBNETS that no route of this machine and no other bed uses."""
    routes = json.loads(ip("-j", "route", "show", "table", "all").stdout or "[]")
    used = []
    for route in routes:
        try:  # "default" and IPv6 or multicast entries are no /24 of ours
            used.append(ipaddress.IPv4Network(route.get("dst", ""), strict=False))
        except ValueError:
            continue
    for candidate in SUBNETS.subnets(new_prefix=24):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetBedUnavailable(f"no free /24 left in {SUBNETS}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    """Every network namespace's name (`ip netns list` adds "(id: N)" to some)."""
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def _remove_bed(bed_id: str) -> None:
    mine = [ns for ns in _namespaces() if ns.startswith(f"{PREFIX}-{bed_id}-")]
    for ns in mine:
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
    for ns in mine:
        ip("netns", "del", ns, check=False)  # takes its veth ends, and so their peers, with it
    ip("link", "del", f"{PREFIX}{bed_id}c", check=False)
    (STATE_DIR / f"{bed_id}.json").unlink(missing_ok=True)


def bed_ids() -> set[str]:
    """Beds on this machine: those with a state file and those with namespaces only."""
    found = {ns.split("-")[1] for ns in _namespaces() if ns.startswith(f"{PREFIX}-") and ns.count("-") >= 2}
    found |= {p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.exists() else set()
    return found - {"probe"}


def sweep_stale(everything: bool = False) -> list[str]:
    """Remove the beds whose owner is gone (all beds with `everything`); returns their ids."""
    removed = []
    for bed_id in sorted(bed_ids()):
        state_file = STATE_DIR / f"{bed_id}.json"
        owner = json.loads(state_file.read_text()).get("pid") if state_file.exists() else None
        if everything or owner is None or not _pid_alive(int(owner)):
            _remove_bed(bed_id)
            removed.append(bed_id)
    return removed
