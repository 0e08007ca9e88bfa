#!/usr/bin/env bash
# Issue 5 in ONE call on a 4-GPU machine (kind nvidia-h200-x4): the parts of device_engine.sh side
# by side, one GPU each (each part measures one GPU, as on a single-H200 machine):
#   GPU 0: part1 (S1 every n + base-only, merged models, S4 if time is left)
#   GPU 1: part2 (S2, end to end S1 through Kafka + Redis, HF PEFT)
#   GPU 2: the engine's GPU tests (fused elementwise kernels, side-stream adapter loads, greedy
#          equality with HF PEFT), then the host-overhead profile
#   GPU 3: S1 headline with a longer trace (DUR3 s) at n = 2000, base-only and n = 5
# Results in $OUT/results.tgz (part1/, part2/, tests/, headline/).   bash bench/device_all.sh COMMIT
# Carry: .whl and .devkit (see device_engine.sh).
set -o pipefail
export PYTHONUNBUFFERED=1
COMMIT=${1:-unknown}
OUT=${OUT:-bench/results/h200}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"/{part1,part2,tests,headline}
. bench/device_env.sh
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 OUT=$OUT/part1 BUDGET=$BUDGET bash bench/device_engine.sh part1 "$COMMIT" > "$OUT/part1/run.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 OUT=$OUT/part2 BUDGET=$BUDGET bash bench/device_engine.sh part2 "$COMMIT" > "$OUT/part2/run.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=2
  # the whole log (tracebacks included) goes back: a tail of FAILED lines says nothing of why
  timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfs --tb=short -W ignore \
    tests/kernels/test_fused_kernels.py tests/kernels/test_fused_model.py tests/kernels/test_lora_kernels.py::test_ops_keep_no_reference_to_activations \
    tests/engine/test_gpu_fused_ops.py tests/engine/test_gpu_engine.py tests/engine/test_adapter_upload_gpu.py \
    > "$OUT/tests/pytest.log" 2>&1
  tail -3 "$OUT/tests/pytest.log"
  timeout 120 python3 -m lorafleet.bench.profile_host --setting S1 --commit "$COMMIT" --out "$OUT/tests"
) > "$OUT/tests/run.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=3
  timeout $((BUDGET - 20)) python3 -m lorafleet.bench.engine_bench --setting S1 --n 2000 0 5 --warmup 2 --rate 50 \
    --duration "${DUR3:-30}" --max-num-seqs 512 --commit "$COMMIT" --out "$OUT/headline"
) > "$OUT/headline/run.log" 2>&1 &
wait
for f in part1 part2 headline; do echo "== $f"; tail -6 "$OUT/$f/run.log"; done
echo "== tests"; grep -E "passed|failed|error" "$OUT/tests/run.log" | tail -5
# The device tool returns only a few files per call: everything goes back as one archive.
tar czf "$OUT/results.tgz" -C "$OUT" part1 part2 tests headline && rm -rf "$OUT"/{part1,part2,tests,headline}
ls -la "$OUT"
