#!/usr/bin/env bash
# One call on a 4-GPU machine (issue 7): TP engine equality on the GPUs (W = 1, 2, 4, both LoRA
# schemes; the paged-LoRA unit test runs in CI under the Triton interpreter), then S1 / S2
# throughput at W = 1, 2, 4 (LoRA fused and slora, base-only). Results into $OUT (default bench/results/tp). Designed to finish in < 9 min:
# the benchmark gets what is left of BUDGET_S after the tests and skips runs that would not fit.
#   bash bench/device_tp.sh
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-bench/results/tp}
BUDGET_S=${BUDGET_S:-500}
T0=$(date +%s)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
python3 -c "import torch, triton, transformers, msgspec; print('torch', torch.__version__, 'triton', triton.__version__, transformers.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests ($(date +%T))"
  timeout "${TEST_TIMEOUT:-250}" python3 -m pytest tests/tp/test_tp_gpu.py -q -p no:cacheprovider -o addopts="" -rs 2>&1 | grep -v Warning | tee "$OUT/gpu_tests.log" | tail -25
fi
LEFT=$(( BUDGET_S - ($(date +%s) - T0) - 15 ))
LEFT=$(( LEFT < 30 ? 30 : LEFT ))
echo "== benchmark, ${LEFT} s left ($(date +%T))"
timeout $(( LEFT + 40 )) python3 -m bench.tp_bench --worlds 1 2 4 --settings S1 S2 --schemes fused slora replicated_a --n 100 \
  --rate "${RATE:-40}" --duration "${DURATION:-6}" --budget-s "$LEFT" --out "$OUT" ${COMMIT:+--commit "$COMMIT"} 2>&1 \
  | grep -v -i warning | tee "$OUT/bench.log" | tail -40
echo "== done in $(( $(date +%s) - T0 )) s"
