#!/usr/bin/env bash
# Set up (if needed) and run the demo: `lorafleet demo` starts the embedded stack (Kafka-protocol
# broker, redis-server, adapter store, ingest, engine) with the demo model and adapters, sends
# requests over every demo adapter and the base model, and streams the replies here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec lorafleet demo "$@"
