#!/usr/bin/env bash
# One call on the GPU machine: the kernel test grid, then every benchmark, results into $OUT.
#   bash bench/kernels/device_run.sh COMMIT        (OUT defaults to bench/results/kernels)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/kernels}
mkdir -p "$OUT"
. bench/device_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout "${TEST_TIMEOUT:-230}" python3 -m pytest tests/kernels -q -n 4 -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-280}" python3 -m lorafleet.bench.kernels.run_all --out "$OUT" --commit "${1:-unknown}" 2>&1 | tee "$OUT/bench.log" | tail -90
