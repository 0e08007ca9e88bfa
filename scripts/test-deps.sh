#!/usr/bin/env bash
# The suite against releases the lock does not hold, in a scratch virtualenv (never .venv), so an
# upstream break is seen here before users meet it:
#   bash scripts/test-deps.sh latest   # the newest release of every dependency pyproject.toml allows
#   bash scripts/test-deps.sh lowest   # the lowest version pyproject.toml allows of each direct one
# Extra arguments go to pytest (e.g. -x, or a test path). torch stays at the lock's CPU build in
# both modes: a newer or older release would be PyPI's multi-GB CUDA build on this machine.
# Exit status: pytest's (5, no tests, is a failure). `pip freeze` of the scratch env is printed
# first, beside the lock's versions where they differ.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bash scripts/test-deps.sh latest|lowest [pytest args]}
shift
case "$MODE" in latest|lowest) ;; *) echo "mode must be latest or lowest, not $MODE" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
VENV=$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-$MODE-XXXX")
# KEEP_VENV=1 keeps the scratch virtualenv (to rerun one failing test in it); its path is printed.
if [ -n "${KEEP_VENV:-}" ]; then echo "scratch virtualenv: $VENV"; else trap 'rm -rf "$VENV"' EXIT; fi
"$PY" -m venv "$VENV" || exit 1
. "$VENV/bin/activate"
TORCH=$(grep -E '^torch==' requirements.lock | cut -d' ' -f1)
python -m pip install -q "$TORCH" || exit 1
if [ "$MODE" = latest ]; then
  python -m pip install -q --upgrade -e ".[engine,test,bench]" || exit 1
else
  # uv resolves the lowest direct versions (pip has no such mode); pip installs them.
  python -m pip install -q "$(sed -n 's/^UV_PIN="\(.*\)"$/\1/p' scripts/lock.sh)" || exit 1
  pins=$VENV/lowest.txt
  echo "$TORCH" > "$VENV/torch.txt"
  uv pip compile pyproject.toml --extra engine --extra test --extra bench --resolution lowest-direct --python-version 3.11 \
    --constraint "$VENV/torch.txt" --no-header --quiet -o "$pins" || exit 1
  python -m pip install -q -c "$pins" -e ".[engine,test,bench]" || exit 1
fi
echo "== $MODE: installed versions that differ from requirements.lock"
python -m pip freeze --exclude-editable | while IFS='=' read -r name _ version; do
  locked=$(grep -i -E "^${name//[-_.]/[-_.]}==" requirements.lock | head -1 | cut -d= -f3 | cut -d' ' -f1)
  [ -n "$locked" ] && [ "$locked" != "${version%%+*}" ] && echo "  $name $version (lock: $locked)"
done
# The lock-conformance test does not apply here (LORAFLEET_UNLOCKED).
LORAFLEET_UNLOCKED=$MODE python -m pytest -q -rs -p no:cacheprovider "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "pytest collected no tests: failing" >&2; exit 1; }
exit "$rc"
