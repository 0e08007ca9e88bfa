#!/usr/bin/env bash
# Issue 5's remaining table cells and its targets in ONE call of ~5 min on 4 GPUs (nvidia-h200-x4),
# one run per GPU side by side (each measures one GPU, as on a one-H200 machine):
#   GPU 0: S1, 30 s trace: n = 2000 then base-only (target: n = 2000 >= 30 req/s, within 10% of base)
#   GPU 1: S2, 12 s trace: n = 5, base-only, 2000 (target: S2 within 15% of S1)
#   GPU 2: HF PEFT: S1 n = 5, 100, then S2 n = 5 (no batch starts after HF_S seconds of each n)
#   GPU 3: S1, 12 s trace: n = 5 then 10000 (target: within 10%), then the merged-model S2 baseline
# Results in $OUT/results.tgz (gpu0..gpu3/: JSON, markdown, logs).   COMMIT=<sha> bash bench/device_targets.sh
# Carry: .whl (bench/README.md). BUDGET: seconds for the whole call (default 270).
set -o pipefail
export PYTHONUNBUFFERED=1
COMMIT=${COMMIT:?set COMMIT to the commit under test (git on the device copy may be stale)}
OUT=${OUT:-bench/results/h200}
BUDGET=${BUDGET:-270}
HF_S=${HF_S:-20}
mkdir -p "$OUT"/{gpu0,gpu1,gpu2,gpu3}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
B=(--commit "$COMMIT" --max-num-seqs 512 --rate 50)
# on GPU G, within what is left of BUDGET: CMD... > gpuG/NAME.log
run_on() {
  local gpu=$1 name=$2 left=$((BUDGET - SECONDS - 5))
  shift 2
  ((left < 20)) && { echo "$name skipped: ${left}s left" >> "$OUT/gpu$gpu/skipped.txt"; return; }
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$left" "$@" --out "$OUT/gpu$gpu" > "$OUT/gpu$gpu/$name.log" 2>&1
}
run_on 0 engine-S1-30s python3 -m bench.engine_bench --setting S1 --n 2000 0 --warmup 2 --duration 30 "${B[@]}" &
run_on 1 engine-S2 python3 -m bench.engine_bench --setting S2 --n 5 0 2000 --warmup 2 --duration 12 "${B[@]}" &
( run_on 2 hf-S1 python3 -m bench.hf_baseline --setting S1 --n 5 100 --duration 12 --max-requests 64 --batch 32 \
    --budget-s "$HF_S" --commit "$COMMIT"
  run_on 2 hf-S2 python3 -m bench.hf_baseline --setting S2 --n 5 --duration 12 --max-requests 64 --batch 32 \
    --budget-s "$HF_S" --commit "$COMMIT" ) &
( run_on 3 engine-S1-12s python3 -m bench.engine_bench --setting S1 --n 5 10000 --warmup 2 --duration 12 "${B[@]}"
  run_on 3 merged-S2 python3 -m bench.merged_baseline --setting S2 --n 5 --warmup 1 --duration 12 "${B[@]}" ) &
wait
for g in 0 1 2 3; do echo "== gpu$g"; grep -h -E '^\[(engine_bench|merged|hf-peft)\] \{' "$OUT"/gpu$g/*.log | cut -c1-260; cat "$OUT/gpu$g/skipped.txt" 2>/dev/null; done
# The device tool returns only a few files per call: everything goes back as one archive.
tar czf "$OUT/results.tgz" -C "$OUT" gpu0 gpu1 gpu2 gpu3 && rm -rf "$OUT"/gpu{0,1,2,3}
ls -la "$OUT"
