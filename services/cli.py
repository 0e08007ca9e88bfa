"""`lorafleet`: the command line (contract section 4).

    lorafleet up             the whole stack on one machine (embedded broker and redis when none given)
    lorafleet ingest         the ingest service alone
    lorafleet engine         one engine alone
    lorafleet adapter-store  the node's adapter store alone
    lorafleet gateway        the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)
    lorafleet demo           `up` with the demo model and adapters, then requests streamed to the terminal
    lorafleet send           produce a request to the requests topic (prints its id)
    lorafleet tail ID        print a request's reply stream, entry by entry, until its terminal entry
    lorafleet cancel ID      cancel a request (it ends with error `cancelled`)

Every setting's flag takes its default from a LORAFLEET_* variable (services/common/settings.py);
`--help` names it beside each flag.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from lorafleet.common import settings
from lorafleet.common.ready_file import write_ready_file
from lorafleet.demo.assets import demo_model_and_adapters


def _ready_file_flag(p: argparse.ArgumentParser) -> None:
    settings.add_flag(p, "--ready-file", "READY_FILE", str, "write a JSON object here once ready to take work")


def _metrics_flag(p: argparse.ArgumentParser) -> None:
    settings.add_flag(p, "--metrics-port", "METRICS_PORT", int,
                      "HTTP port of /metrics, /health and /ready (0: any free port, in the ready file; -1: none)")


def _check_flag(p: argparse.ArgumentParser) -> None:
    """Probes (services/health.py): run the check with the service's own flags and exit 0/1."""
    p.add_argument("--check", choices=("live", "ready"), default=None,
                   help="do not start the service: check a running one (heartbeat of --ready-file; "
                        "ready: also the brokers and stores it needs) and exit 0 when healthy, 1 when not "
                        "[no env: a probe mode of the command, never a setting of the service]")


def build_parser() -> argparse.ArgumentParser:
    from lorafleet.engine.serving.config import EngineServiceConfig
    from lorafleet.ingest.config import IngestConfig

    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine")
    from lorafleet.stack import add_up_arguments

    add_up_arguments(up)
    _ready_file_flag(up)

    ingest = sub.add_parser("ingest", help="run the ingest service")
    IngestConfig.add_arguments(ingest)
    _ready_file_flag(ingest)
    _metrics_flag(ingest)
    _check_flag(ingest)

    engine = sub.add_parser("engine", help="run one engine")
    EngineServiceConfig.add_arguments(engine)
    _ready_file_flag(engine)
    _metrics_flag(engine)
    _check_flag(engine)

    store = sub.add_parser("adapter-store", help="run the node's adapter store")
    settings.add_flag(store, "--model", "MODEL", str, "base model folder")
    settings.add_flag(store, "--adapters", "ADAPTERS", str, "adapter root URL")
    from lorafleet.adapter_store.config import AdapterStoreConfig

    settings.add_config_flags(store, AdapterStoreConfig)  # every store knob, from its fields
    _ready_file_flag(store)
    _metrics_flag(store)
    _check_flag(store)

    from lorafleet.gateway.config import GatewayConfig

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP API")
    GatewayConfig.add_arguments(gateway)
    _ready_file_flag(gateway)
    _metrics_flag(gateway)
    _check_flag(gateway)

    from lorafleet.adapter_tools import add_adapters_arguments

    add_adapters_arguments(sub.add_parser("adapters", help="validate, push and list adapters (file:// or s3:// roots)"))

    demo = sub.add_parser("demo", help="start the stack with the demo model and adapters and stream replies")
    settings.add_flag(demo, "--device", "DEVICE", str, "cpu, cuda or auto")

    from lorafleet.client_cli import add_cancel_arguments, add_send_arguments, add_tail_arguments

    add_send_arguments(sub.add_parser("send", help="produce a request to the requests topic and print its id"))
    add_tail_arguments(sub.add_parser("tail", help="print a request's reply entries until the terminal one"))
    add_cancel_arguments(sub.add_parser("cancel", help="cancel a request: it ends with error `cancelled`"))
    return parser


async def _run_ingest(args) -> None:
    from lorafleet.ingest.config import IngestConfig
    from lorafleet.ingest.metrics import IngestMetrics
    from lorafleet.ingest.service import run_ingest

    model, _ = demo_model_and_adapters(args.model, "-")
    cfg = IngestConfig.from_args(args, model_dir=model)
    ready = asyncio.Event()
    metrics = IngestMetrics(_process_registry())
    task = asyncio.create_task(run_ingest(cfg, ready=ready, metrics=metrics))
    await _signal_ready(task, ready, args, {"service": "ingest"}, metrics.registry)


async def _run_engine(args) -> None:
    from lorafleet.engine.serving.config import EngineServiceConfig
    from lorafleet.engine.serving.metrics import EngineMetrics
    from lorafleet.engine.serving.serve import run_engine_service
    from lorafleet.engine.serving.stall_watch import StallWatch

    model, _ = demo_model_and_adapters(args.model, "-")
    cfg = EngineServiceConfig.from_args(args, model_dir=model)
    ready = asyncio.Event()
    watch = StallWatch(cfg.step_stall_s)  # a hung step withholds the heartbeat (liveness)
    metrics = EngineMetrics(settings.read("METRICS_ADAPTER_LABELS"), _process_registry())
    task = asyncio.create_task(run_engine_service(cfg, ready=ready, watch=watch, metrics=metrics))
    await _signal_ready(task, ready, args, {"service": "engine", "engine_id": cfg.name}, metrics.registry,
                        watch.problem)


async def _run_store(args) -> None:
    from lorafleet.adapter_store.config import AdapterStoreConfig
    from lorafleet.adapter_store.metrics import StoreMetrics
    from lorafleet.adapter_store.server import run_adapter_store
    from lorafleet.common.signals import install_signal_stop

    model, adapters = demo_model_and_adapters(args.model, args.adapters)
    cfg = AdapterStoreConfig.from_env_and_args(model_dir=model, adapters_root=adapters,
                                               **settings.config_values(AdapterStoreConfig, args))
    # SIGTERM must close the server and delete the shared files: killed by the default handler,
    # the store would leave its adapters in the node's /dev/shm (host memory) after the pod is gone.
    stop, _installed = install_signal_stop(None)
    ready = asyncio.Event()
    payload = {"service": "adapter-store"}

    def on_ready(address: str) -> None:
        payload["address"] = address
        ready.set()

    metrics = StoreMetrics(_process_registry())
    task = asyncio.create_task(run_adapter_store(cfg, stop=stop, on_ready=on_ready, metrics=metrics))
    await _signal_ready(task, ready, args, payload, metrics.registry)


async def _run_gateway(args) -> None:
    from lorafleet.gateway.config import GatewayConfig
    from lorafleet.gateway.metrics import GatewayMetrics
    from lorafleet.gateway.service import run_gateway

    cfg = GatewayConfig.from_args(args)
    ready = asyncio.Event()
    payload = {"service": "gateway"}

    def on_ready(port: int) -> None:
        payload["port"] = port
        ready.set()

    metrics = GatewayMetrics(_process_registry())
    task = asyncio.create_task(run_gateway(cfg, on_ready=on_ready, metrics=metrics))
    await _signal_ready(task, ready, args, payload, metrics.registry)


def _process_registry():
    """A registry with the process's own metrics (CPU, memory, open files, Python GC)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


async def _signal_ready(task: asyncio.Task, ready: asyncio.Event, args: argparse.Namespace, payload: dict,
                        registry, problem=None) -> None:
    """Serve /metrics, /health and /ready (common/service_http.py) from the start; write the
    ready file (with the metrics port) once the service is ready, then keep its heartbeat (the
    liveness probe's evidence that the event loop turns) until the service returns; withheld
    while problem() names one (keep_heartbeat)."""
    from lorafleet.common.service_http import ServiceHttp
    from lorafleet.health import keep_heartbeat, problems

    ready_file, http = args.ready_file, None
    if args.metrics_port >= 0:
        # Each probe request runs the exec probe's checks in the server's thread (its own loop).
        http = ServiceHttp(args.metrics_port, registry,
                           lambda mode: asyncio.run(problems(args.command, mode, args))).start()
        payload["metrics_port"] = http.port  # the caller's dict: what it adds once ready is kept
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    heartbeat = None
    if ready.is_set():
        write_ready_file(ready_file, payload)
        if ready_file:
            heartbeat = asyncio.create_task(keep_heartbeat(ready_file, problem=problem))
    waiter.cancel()
    try:
        await task
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        if http is not None:
            http.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "check", None):
        from lorafleet.health import run_check

        return run_check(args.command, args)
    from lorafleet.common.logging import configure_logging

    configure_logging(args.command)
    try:
        if args.command == "up":
            from lorafleet.stack import run_up

            return run_up(args)
        if args.command == "demo":
            from lorafleet.demo.run import run_demo

            return run_demo(args)
        if args.command == "adapters":
            from lorafleet.adapter_tools import run_adapters

            return run_adapters(args)
        if args.command in ("send", "tail", "cancel"):
            from lorafleet import client_cli

            return getattr(client_cli, f"run_{args.command}")(args)
        runner = {"ingest": _run_ingest, "engine": _run_engine, "adapter-store": _run_store,
                  "gateway": _run_gateway}[args.command]
        asyncio.run(runner(args))
        return 0
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"lorafleet {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
