#!/usr/bin/env bash
# One call on the GPU machine: engine correctness on the GPU, a step profile, the S1 benchmark
# with its base-only bound, and the HF PEFT baseline. Results into $OUT.
#   bash bench/device_engine.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/engine}
mkdir -p "$OUT"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest tests/engine/test_gpu_engine.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_engine_tests.log" | tail -15
timeout 100 python3 -m bench.profile_step --setting S1 --batch 256 --distinct 64 --out "$OUT" 2>&1 | tail -45
timeout "${BENCH_TIMEOUT:-250}" python3 -m bench.engine_bench --setting S1 --n ${NS:-5 100 2000} --rate 50 --duration 20 --base-only --out "$OUT" 2>&1 | grep -v Warning | tail -8
timeout 100 python3 -m bench.hf_baseline --setting S1 --n 5 100 --out "$OUT" 2>&1 | grep -v Warning | tail -4
