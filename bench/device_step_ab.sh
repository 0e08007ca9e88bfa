#!/usr/bin/env bash
# One GPU call: this tree's GPU tests, then the decode step of earlier trees and this one side by
# side (bench/step_ab.py: fresh processes per tree, alternating, base-only and LoRA).
#   bash bench/device_step_ab.sh COMMIT BASE [BASE...]   # COMMIT: `git rev-parse HEAD` here
# Carry .ab (for each BASE: git archive BASE -o .ab/BASE.tar), .devkit (bash bench/devkit.sh) and
# .whl (pytest-asyncio, pytest-timeout). Env: TESTS (pytest paths; "" skips the tests), SETTINGS
# (S1 S2), BATCH (64), ROUNDS (2). Results in $OUT: pytest-gpu.log, step_ab.log, step_ab.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
COMMIT=${1:?usage: bash bench/device_step_ab.sh COMMIT BASE [BASE...]}
shift
(($#)) || { echo "usage: bash bench/device_step_ab.sh COMMIT BASE [BASE...]"; exit 2; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pipt() { python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$@" 2>&1 | grep -v -i warning | tail -2; }
# The dependencies the device lacks in one folder, each tree in its own (a child imports one tree only).
shopt -s nullglob; pipt /tmp/deps .whl/*.whl .devkit/*.whl; shopt -u nullglob
pipt /tmp/site-new .
trees=()
for base in "$@"; do
  mkdir -p "/tmp/src-$base" && tar -xf ".ab/$base.tar" -C "/tmp/src-$base" && pipt "/tmp/site-$base" "/tmp/src-$base"
  trees+=(--tree "$base=/tmp/site-$base:/tmp/deps")
done
export PYTHONPATH=/tmp/site-new:/tmp/deps
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)"
TESTS=${TESTS-tests/engine/test_gpu_engine.py tests/engine/test_adapter_upload_gpu.py tests/kernels/test_kernels_cuda_graph.py tests/engine/test_gpu_fused_ops.py tests/tp/test_tp_gpu.py tests/tp/test_rank_tables.py tests/test_import_layers.py}
if [[ -n $TESTS ]]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs $TESTS > "$OUT/pytest-gpu.log" 2>&1
  echo "pytest rc $?"
  tail -8 "$OUT/pytest-gpu.log"
fi
for s in ${SETTINGS:-S1 S2}; do
  timeout "${AB_TIMEOUT:-280}" python3 -m lorafleet.bench.step_ab "${trees[@]}" \
    --tree "$COMMIT=/tmp/site-new:/tmp/deps" --setting "$s" --batch "${BATCH:-64}" --adapters 32 \
    --rounds "${ROUNDS:-2}" --commit "$COMMIT" --out "$OUT/step_ab/$s" >> "$OUT/step_ab.log" 2>&1
  echo "step_ab $s rc $?"
done
grep -v Loading "$OUT/step_ab.log" | tail -30
(cd "$OUT" && tar czf step_ab.tgz step_ab && rm -rf step_ab)
