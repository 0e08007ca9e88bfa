#!/usr/bin/env bash
# Refresh requirements.lock, the one lock every install goes through (scripts/setup.sh, .ci/run via
# scripts/test.sh, the Dockerfile):  bash scripts/lock.sh
# Then run `bash scripts/test.sh` and commit the lock only if the suite passes with it.
#
# uv's `pip compile` resolves pyproject.toml (every extra) once for all platforms and Pythons the
# project supports (--universal, one version per package: --fork-strategy fewest), so CI (Python
# 3.11, CPU) and the Docker image (Python 3.12, CUDA) install the same versions, under the pins
# of requirements.pins (torch: the one place its version is declared).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_PIN="uv==0.13.9"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "$UV_PIN"
# The current lock is the starting point: uv keeps its versions unless pyproject.toml needs others,
# so adding a dependency does not upgrade everything else (--upgrade in LOCK_ARGS refreshes all).
cp requirements.lock requirements.lock.new
uv pip compile ${LOCK_ARGS:-} pyproject.toml --universal --fork-strategy fewest --python-version 3.11 \
  --extra engine --extra test --extra bench --constraint requirements.pins --no-header --quiet -o requirements.lock.new
{
  echo "# The lock: exact versions of everything lorafleet installs, tested by CI. Used as pip"
  echo "# constraints (-c), so platform-only pins (nvidia-*, torch's CUDA runtime) install only where needed."
  echo "# Refresh: bash scripts/lock.sh   (uv pip compile of pyproject.toml, all extras, under requirements.pins;"
  echo "# it keeps these versions where it can: LOCK_ARGS=--upgrade for the newest)"
  cat requirements.lock.new
} > requirements.lock
rm requirements.lock.new
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
