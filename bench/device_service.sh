#!/usr/bin/env bash
# The service path on one GPU, in one device call of about 2 minutes: the engine's GPU tests that
# guard it (greedy equality with CUDA graphs, adapter uploads, kernel graphs, fused ops, the
# engine thread, the import layers), then the service-overhead benchmark on CUDA (the in-process
# engine beside `lorafleet up` with the embedded broker and redis-server on the same machine).
#   bash bench/device_service.sh COMMIT      # COMMIT: `git rev-parse HEAD` here (the device's copy has no history)
# Carry .devkit (bash bench/devkit.sh: redis-server, Tansu, the service path's wheels) and .whl
# (pytest-asyncio, which the device lacks). Results in $OUT: pytest-gpu.log, so.log, so.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
COMMIT=${1:?usage: bash bench/device_service.sh COMMIT}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. bench/device_env.sh
chmod +x .devkit/redis-server .devkit/redis/redis-server 2>/dev/null
export LORAFLEET_REDIS_SERVER_BIN=$PWD/.devkit/redis-server
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)"
timeout 260 python3 -m pytest -q -p no:cacheprovider -rs tests/engine/test_gpu_engine.py \
  tests/engine/test_adapter_upload_gpu.py tests/kernels/test_kernels_cuda_graph.py tests/engine/test_gpu_fused_ops.py \
  tests/service/test_engine_thread.py tests/test_import_layers.py > "$OUT/pytest-gpu.log" 2>&1
echo "pytest rc $?"
tail -5 "$OUT/pytest-gpu.log"
timeout 280 python3 -m lorafleet.bench.service_overhead --device cuda --requests 480 960 --max-tokens 48 --repeat 2 \
  --commit "$COMMIT" --out "$OUT/so" > "$OUT/so.log" 2>&1
echo "bench rc $?"
grep -v Loading "$OUT/so.log" | tail -25
(cd "$OUT" && tar czf so.tgz so && rm -rf so)
