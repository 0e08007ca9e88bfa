#!/usr/bin/env bash
# The multi-host test bed on this machine (bench/netbed): network namespaces joined by a bridge, one
# host each for the broker, Redis, S3 + the adapter store, the ingest and three engines.
#   bash scripts/netbed.sh up        start it (prints the addresses); Ctrl-C removes all of it
#   bash scripts/netbed.sh down      remove what a crashed run left (--all: every bed)
#   bash scripts/netbed.sh status    list the beds
# Needs root and iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m lorafleet.bench.netbed "$@"
