#!/usr/bin/env bash
# Issue 5's full S1 and S2 tables at one commit: on a 2-GPU machine (nvidia-h200-x2) in two calls
# of at most ~9 min, or PART=all on 4 GPUs (nvidia-h200-x4: tables on GPUs 0-1, baselines on 2-3)
# in one; one run per GPU side by side (each measures one GPU, as on a one-H200 machine):
#   PART=tables     GPU 0: S1 engine, 12 s trace: n = 2000, 5, 10000, 100, 1000, base-only
#                   GPU 1: host profile of S2 (steps, adapter loads by rank), then the S2 engine
#                          runs in the same order
#   PART=baselines  GPU 0 (2): HF PEFT S1 n = 5, 100 (HF_S seconds each), merged-model S1 n = 5
#                   GPU 1 (3): HF PEFT S2 n = 5, 100, merged-model S2 n = 5, then the fused-kernel
#                          GPU tests (their full log)
#   PART=ab         the tables on GPUs 0-1 and again on 2-3 with --pack-threads $AB_PACK_THREADS (1)
# Runs are ordered so that a part cut by BUDGET loses the least needed ones.
#   PART=all COMMIT=<sha> bash bench/device_tables.sh        (carry .whl; results in $OUT/results.tgz)
set -o pipefail
export PYTHONUNBUFFERED=1
PART=${PART:?set PART to tables, baselines, all or ab}
COMMIT=${COMMIT:?set COMMIT to the commit under test (git on the device copy may be stale)}
OUT=${OUT:-bench/results/h200}
BUDGET=${BUDGET:-540}
HF_S=${HF_S:-75}
mkdir -p "$OUT"/{gpu0,gpu1,gpu2,gpu3}
. bench/device_env.sh
B=(--commit "$COMMIT" --max-num-seqs 512 --rate 50)
HF=(--max-requests 64 --batch 16 --max-wait-s 2 --budget-s "$HF_S" --duration 12 --commit "$COMMIT")
# on GPU G, within what is left of BUDGET: CMD... > gpuG/NAME.log
run_on() {
  local gpu=$1 name=$2 left=$((BUDGET - SECONDS - 5))
  shift 2
  ((left < 20)) && { echo "$name skipped: ${left}s left" >> "$OUT/gpu$gpu/skipped.txt"; return; }
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$left" "$@" --out "$OUT/gpu$gpu" > "$OUT/gpu$gpu/$name.log" 2>&1
}
tables() {  # on GPUs $1 and $2, engine flags after them (an A/B pair runs the runs that matter most)
  local g1=$1 g2=$2 tag=${3:+-ab}
  shift 2
  run_on "$g1" engine-S1$tag python3 -m lorafleet.bench.engine_bench --setting S1 --n 2000 5 10000 100 1000 0 --warmup 2 --duration 12 "${B[@]}" "$@" &
  ( [ -z "$tag" ] && run_on "$g2" profile-S2 python3 -m lorafleet.bench.profile_host --setting S2 --commit "$COMMIT"
    run_on "$g2" engine-S2$tag python3 -m lorafleet.bench.engine_bench --setting S2 --n 2000 5 0 100 1000 10000 --warmup 2 --duration 12 "${B[@]}" "$@" ) &
}
baselines() {  # on GPUs $1 and $2
  ( run_on "$1" hf-S1 python3 -m lorafleet.bench.hf_baseline --setting S1 --n 5 100 "${HF[@]}"
    run_on "$1" merged-S1 python3 -m lorafleet.bench.merged_baseline --setting S1 --n 5 --warmup 1 --duration 12 "${B[@]}" ) &
  ( run_on "$2" hf-S2 python3 -m lorafleet.bench.hf_baseline --setting S2 --n 5 100 "${HF[@]}"
    run_on "$2" merged-S2 python3 -m lorafleet.bench.merged_baseline --setting S2 --n 5 --warmup 1 --duration 12 "${B[@]}"
    left=$((BUDGET - SECONDS - 5))
    ((left > 30)) && CUDA_VISIBLE_DEVICES=$2 timeout -k 5 "$left" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
      -rfs --tb=short -W ignore tests/kernels/test_fused_kernels.py > "$OUT/gpu$2/pytest-fused.log" 2>&1 ) &
}
case $PART in
tables) tables 0 1 ;;
baselines) baselines 0 1 ;;
all) tables 0 1; baselines 2 3 ;;
ab) tables 0 1; tables 2 3 --pack-threads "${AB_PACK_THREADS:-1}" ;;  # the tables beside a variant of them
*) echo "PART must be tables, baselines, all or ab, got $PART"; exit 2 ;;
esac
wait
for g in 0 1 2 3; do echo "== gpu$g"; grep -h -E '^\[(engine_bench|merged|hf-peft)\] \{' "$OUT"/gpu$g/*.log | cut -c1-300; cat "$OUT/gpu$g/skipped.txt" 2>/dev/null; done
tail -3 "$OUT"/gpu*/pytest-fused.log 2>/dev/null
# The device tool returns only a few files per call: everything goes back as one archive.
tar czf "$OUT/results.tgz" -C "$OUT" gpu0 gpu1 gpu2 gpu3 && rm -rf "$OUT"/gpu{0,1,2,3}
ls -la "$OUT"
