#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine, and again before every run (idempotent, seconds when
# nothing changed): a virtualenv in .venv holding exactly the versions of requirements.lock, with
# lorafleet installed editable, and redis-server when the machine lacks it.
# Needs: Python >= 3.11 with its venv module (Debian/Ubuntu: python3-venv), and root or sudo for
# the one apt-get step. kubectl, where present, renders deploy/k8s in the tests (they skip without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "lorafleet needs Python >= 3.11 ($PY is $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "could not create .venv: install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
fi
. .venv/bin/activate
# Everything goes through the lock, as constraints: what is installed is what CI tested, whatever
# PyPI released since. torch comes first and alone: the lock's version is the CPU build that pip
# finds on disk here (elsewhere PyPI's build of the same version).
python -m pip install -q -c requirements.lock torch
python -m pip install -q -c requirements.lock -e ".[engine,test,bench]"
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
