#!/usr/bin/env bash
# One call of about 300 s on a 4-GPU machine (issue 7): TP engine equality on the GPUs (W = 1, 2, 4,
# both LoRA schemes; the paged-LoRA unit test runs in CI under the Triton interpreter), then S1
# throughput at W = 1, 2, 4: base-only and LoRA under fused at each W, then slora / replicated_a
# while time is left. Results into $OUT (default bench/results/tp).
#   bash bench/device_tp.sh
# env: BUDGET_S (300: the whole script), TEST_TIMEOUT (400: the GPU tests), SKIP_TESTS, SKIP_BENCH, RATE (40),
#      DURATION (4: seconds of arrivals per run), SETTINGS (S1), COMMIT, OUT, GRAPHS (1: decode CUDA
#      graphs at every W, tp_cuda_graphs, with split phases), WORLDS ("1 2 4"), TESTS (the pytest files:
#      tests/tp/test_tp_gpu.py), BENCH_ARGS (more tp_bench flags, e.g. --w1-tp).
# The tests' full log (pytest -v --tb=short, per-case durations) goes to $OUT/gpu_tests.log; the
# benchmark gets what is left of BUDGET_S and skips the engines and runs that would not fit.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-bench/results/tp}
BUDGET_S=${BUDGET_S:-300}
T0=$(date +%s)
mkdir -p "$OUT"
. bench/device_env.sh
python3 -c "import torch, triton, transformers, msgspec; print('torch', torch.__version__, 'triton', triton.__version__, transformers.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests, at most ${TEST_TIMEOUT:-400} s ($(date +%T))"
  # -s: each engine prints its start-up and serving time; --durations: per case (setup = reference).
  timeout -k 5 "${TEST_TIMEOUT:-400}" python3 -m pytest ${TESTS:-tests/tp/test_tp_gpu.py} -v -s --tb=short --durations=0 \
    -p no:cacheprovider -o addopts="" -rs > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit $? (124: cut by the timeout)" | tee -a "$OUT/gpu_tests.log"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|Timeout|engine up|passed|failed" "$OUT/gpu_tests.log" | tail -30
fi
[ -n "${SKIP_BENCH:-}" ] && { echo "== done in $(( $(date +%s) - T0 )) s (no benchmark)"; exit 0; }
LEFT=$(( BUDGET_S - ($(date +%s) - T0) - 10 ))
LEFT=$(( LEFT < 30 ? 30 : LEFT ))
echo "== benchmark, ${LEFT} s left ($(date +%T))"
timeout -k 5 $(( LEFT + 30 )) python3 -m lorafleet.bench.tp_bench --worlds ${WORLDS:-1 2 4} --settings ${SETTINGS:-S1} ${BENCH_ARGS:-} \
  --schemes fused slora replicated_a --n 100 --rate "${RATE:-40}" --duration "${DURATION:-4}" --budget-s "$LEFT" \
  --out "$OUT" ${COMMIT:+--commit "$COMMIT"} ${GRAPHS:+--graphs --decode-steps-per-prefill 4} 2>&1 | grep -v -i warning | tee "$OUT/bench.log" | tail -30
echo "== done in $(( $(date +%s) - T0 )) s"
