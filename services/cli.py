"""`lorafleet`: the command line (contract section 4).

    lorafleet up             the whole stack on one machine (embedded broker and redis when none given)
    lorafleet ingest         the ingest service alone
    lorafleet engine         one engine alone
    lorafleet adapter-store  the node's adapter store alone
    lorafleet demo           `up` with the demo model and adapters, then requests streamed to the terminal

Every flag's default comes from a LORAFLEET_* variable (services/common/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from services.common import settings


def _ready_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", default=None, help="write a JSON object here once ready to take work")


def _write_ready(path: str | None, payload: dict) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)


def _demo_model_and_adapters(model: str, adapters: str) -> tuple[str, str]:
    """Fill in the built-in demo model / adapters where none is given (built once, cached)."""
    if model and adapters:
        return model, adapters
    from services.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(Path(settings.read("CACHE_DIR")).expanduser())
    return model or str(demo.model_dir), adapters or str(demo.adapters_root)


def build_parser() -> argparse.ArgumentParser:
    from services.engine.service_config import EngineServiceConfig
    from services.ingest.config import IngestConfig

    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine")
    from services.stack import add_up_arguments

    add_up_arguments(up)
    _ready_file_flag(up)

    ingest = sub.add_parser("ingest", help="run the ingest service")
    IngestConfig.add_arguments(ingest)
    _ready_file_flag(ingest)

    engine = sub.add_parser("engine", help="run one engine")
    EngineServiceConfig.add_arguments(engine)
    _ready_file_flag(engine)

    store = sub.add_parser("adapter-store", help="run the node's adapter store")
    store.add_argument("--model", default=settings.env_default("MODEL"), help="base model folder" + settings.help_suffix("MODEL"))
    store.add_argument("--adapters", default=settings.env_default("ADAPTERS"), help="adapter root URL" + settings.help_suffix("ADAPTERS"))
    store.add_argument("--address", default=settings.env_default("STORE_ADDRESS"), help="listen host:port" + settings.help_suffix("STORE_ADDRESS"))
    store.add_argument("--shm-dir", default=settings.env_default("STORE_SHM_DIR"), help="shared host-memory folder" + settings.help_suffix("STORE_SHM_DIR"))
    _ready_file_flag(store)

    demo = sub.add_parser("demo", help="start the stack with the demo model and adapters and stream replies")
    demo.add_argument("--device", default=settings.env_default("DEVICE"), help="cpu, cuda or auto")
    return parser


async def _run_ingest(args) -> None:
    from services.ingest.config import IngestConfig
    from services.ingest.service import run_ingest

    model, _ = _demo_model_and_adapters(args.model, "-")
    cfg = IngestConfig.from_args(args, model_dir=model)
    ready = asyncio.Event()
    task = asyncio.create_task(run_ingest(cfg, ready=ready))
    await _signal_ready(task, ready, args.ready_file, {"service": "ingest"})


async def _run_engine(args) -> None:
    from services.engine.service import run_engine_service
    from services.engine.service_config import EngineServiceConfig

    model, _ = _demo_model_and_adapters(args.model, "-")
    cfg = EngineServiceConfig.from_args(args, model_dir=model)
    ready = asyncio.Event()
    task = asyncio.create_task(run_engine_service(cfg, ready=ready))
    await _signal_ready(task, ready, args.ready_file, {"service": "engine", "engine_id": cfg.name})


async def _run_store(args) -> None:
    from services.adapter_store.config import AdapterStoreConfig
    from services.adapter_store.server import run_adapter_store

    model, adapters = _demo_model_and_adapters(args.model, args.adapters)
    cfg = AdapterStoreConfig.from_env_and_args(model_dir=model, adapters_root=adapters, address=args.address, shm_dir=args.shm_dir)
    await run_adapter_store(cfg, on_ready=lambda address: _write_ready(args.ready_file, {"service": "adapter-store", "address": address}))


async def _signal_ready(task: asyncio.Task, ready: asyncio.Event, ready_file: str | None, payload: dict) -> None:
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        _write_ready(ready_file, payload)
    waiter.cancel()
    await task


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.common.logging import configure_logging

    configure_logging(args.command)
    try:
        if args.command == "up":
            from services.stack import run_up

            return run_up(args)
        if args.command == "demo":
            from services.demo.run import run_demo

            return run_demo(args)
        runner = {"ingest": _run_ingest, "engine": _run_engine, "adapter-store": _run_store}[args.command]
        asyncio.run(runner(args))
        return 0
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"lorafleet {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
