"""`lorafleet up`: the whole stack on one machine, each service its own process.

Order: demo assets (if needed) -> embedded broker and redis-server (if none given) -> adapter store
-> ingest, the OpenAI-compatible gateway (unless --gateway-port -1) and engine(s). Each child writes a ready file; when all have, the contract's ready JSON
is written to --ready-file and printed. From then on a child that dies is restarted
(services/supervisor.py) while the broker and Redis keep running; `up` exits on SIGINT/SIGTERM
(children get SIGTERM and drain, then the embedded servers stop) or when a child crash-loops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from lorafleet.common import settings
from lorafleet.gateway.config import served_model_name
from lorafleet.supervisor import CrashLoop, Supervisor

READY_TIMEOUT_S = 600.0  # the first `up` builds the demo assets (minutes on a small CPU)


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    settings.add_flag(p, "--model", "MODEL", str, "Hugging Face model folder", unset="the demo model")
    settings.add_flag(p, "--adapters", "ADAPTERS", str, "adapter root URL (file://, plain path, s3://)", unset="the demo adapters")
    settings.add_flag(p, "--kafka-bootstrap", "KAFKA_BOOTSTRAP", str, "Kafka bootstrap of a running broker", unset="an embedded broker")
    settings.add_flag(p, "--redis-url", "REDIS_URL", str, "Redis URL of a running server", unset="an embedded redis-server")
    settings.add_flag(p, "--device", "DEVICE", str, "cpu, cuda or auto")
    settings.add_flag(p, "--engines", "UP_ENGINES", int, "engine processes to start")
    settings.add_flag(p, "--gateway-port", "GATEWAY_PORT", int,
                      "port of the OpenAI-compatible gateway on 127.0.0.1 (0: any free port; -1: no gateway)")


def run_up(args: argparse.Namespace) -> int:
    from lorafleet.common.embedded import start_broker, start_redis
    from lorafleet.common.ready_file import write_ready_file
    from lorafleet.demo.assets import demo_model_and_adapters

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready_file:  # a file left by an earlier run would hand its dead addresses to `send` / `tail`
        Path(args.ready_file).unlink(missing_ok=True)
    model, adapters = demo_model_and_adapters(args.model, args.adapters)
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-up-"))
    broker = redis = None
    children = None
    try:
        bootstrap = args.kafka_bootstrap
        if not bootstrap:
            broker = start_broker(log_dir=workdir)
            bootstrap = broker.bootstrap
        redis_url = args.redis_url
        if not redis_url:
            redis = start_redis(log_dir=workdir)
            redis_url = redis.url
        from lorafleet.common.embedded import free_port

        env = dict(os.environ)
        env.update({
            "LORAFLEET_KAFKA_BOOTSTRAP": bootstrap, "LORAFLEET_REDIS_URL": redis_url, "LORAFLEET_MODEL": model,
            "LORAFLEET_ADAPTERS": adapters, "LORAFLEET_DEVICE": args.device,
            "LORAFLEET_STORE_ADDRESS": env.get("LORAFLEET_STORE_ADDRESS") or f"127.0.0.1:{free_port()}",
            "LORAFLEET_STORE_SHM_DIR": env.get("LORAFLEET_STORE_SHM_DIR") or str(workdir / "adapters"),
            # services on one host cannot share a port: each takes a free one (its ready file says which)
            "LORAFLEET_METRICS_PORT": "0",
        })
        children = Supervisor(workdir, env, restart_limit=settings.read("UP_RESTART_LIMIT"),
                              restart_window_s=settings.read("UP_RESTART_WINDOW_S"))
        children.start("adapter-store", ["adapter-store"])
        children.start("ingest", ["ingest"])
        if args.gateway_port >= 0:
            # on this host only, unless LORAFLEET_GATEWAY_HOST says otherwise (it has no API key by default)
            children.start("gateway", ["gateway", "--port", str(args.gateway_port),
                                       "--host", env.get("LORAFLEET_GATEWAY_HOST", "127.0.0.1"),
                                       "--served-model-name", settings.read("GATEWAY_MODEL_NAME") or served_model_name(args.model)])
        for i in range(args.engines):
            children.start(f"engine-{i}", ["engine", "--engine-id", f"engine-{i}"])
        children.wait_ready(READY_TIMEOUT_S)
        ready = {
            "kafka_bootstrap": bootstrap, "redis_url": redis_url,
            "requests_topic": settings.read("REQUESTS_TOPIC"), "dlq_topic": settings.read("DLQ_TOPIC"),
            # each service's /metrics, /health and /ready (a restarted service may take another port)
            "metrics": {child.name: f"http://127.0.0.1:{_ready_of(child)['metrics_port']}"
                        for child in children.children},
        }
        gateway = next((child for child in children.children if child.name == "gateway"), None)
        if gateway is not None:  # what an OpenAI client takes as its base_url
            ready["gateway"] = f"http://127.0.0.1:{_ready_of(gateway)['port']}/v1"
        write_ready_file(args.ready_file, ready)
        print(json.dumps(ready), flush=True)
        while not stop.wait(0.5):
            for event in children.supervise():
                print(f"lorafleet up: {event}", file=sys.stderr, flush=True)
        return 0
    except CrashLoop as exc:
        print(f"lorafleet up: {exc}; stopping (logs in {workdir})", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"lorafleet up: {exc}", file=sys.stderr)
        return 1
    finally:
        if children is not None:
            children.stop(settings.read("DRAIN_TIMEOUT_S") + 5)
        for server in (redis, broker):
            if server is not None:
                server.stop()


def _ready_of(child) -> dict:
    return json.loads(child.ready.read_text())
