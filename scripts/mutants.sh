#!/usr/bin/env bash
# Mutation testing of the delivery-critical modules: does the suite notice a planted bug?
#
#   bash scripts/mutants.sh                 # every target below (an hour or more on 2 cores)
#   bash scripts/mutants.sh contract replies  # some of them
#   MUTANTS_DIR=/tmp/x bash scripts/mutants.sh ingest-handler   # resume a session cut short there
#                                                                # (MUTANTS_FRESH=1: start it over)
#
# Cosmic Ray (a maintained mutation-testing tool) plants one mutation at a time in the module,
# IN PLACE, runs the target's tests and restores the file; so this runs in a scratch clone of the
# committed tree (its own virtualenv through the lock), never in your checkout. Each target's
# surviving mutants (the tests still passed) go to docs/mutants/<target>.txt in YOUR checkout;
# docs/mutants/README.md says, per survivor, why it is not a bug or which test now kills it.
# Not in CI: too slow. The operators are one per bug class (negated / off-by-one comparisons,
# + and -, * and /, dropped `not`, swapped booleans and and/or, changed numbers, a loop that never
# runs, break for continue, an exception type replaced), not Cosmic Ray's hundreds of variants.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
COSMIC_RAY="cosmic-ray==8.7.0"

# target -> "module path|tests (the ones that exercise it)|seconds a mutant may take"
declare -A TARGETS=(
  [contract]="services/common/contract.py|tests/service/test_contract.py tests/service/test_contract_fuzz.py tests/gateway/test_openai_api.py|60"
  [peft-config]="services/formats/peft_config.py|tests/engine/test_peft_adapters.py|120"
  [replies]="services/common/replies.py|tests/service/test_replies.py|90"
  [engine-offsets]="services/engine/serving/offsets.py|tests/service/test_engine_offsets.py|60"
  [ingest-handler]="services/ingest/handler.py|tests/service/test_ingest.py tests/service/test_chat_prompts.py tests/service/test_ingest_faults.py|300"
  [ingest-commit]="services/ingest/service.py|tests/service/test_ingest.py tests/service/test_ingest_faults.py|300"
)
ORDER=(contract peft-config replies engine-offsets ingest-handler ingest-commit)
KEEP='ReplaceComparisonOperator_(Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is)|ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul)|ReplaceUnaryOperator_(Delete_Not|USub_UAdd)|AddNot|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd|ReplaceBreakWithContinue|ExceptionReplacer|NumberReplacer|ZeroIterationForLoop'

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ORDER[@]}")
for t in "${targets[@]}"; do
  [ -n "${TARGETS[$t]:-}" ] || { echo "unknown target $t; targets: ${ORDER[*]}" >&2; exit 2; }
done

SCRATCH=${MUTANTS_DIR:-$(mktemp -d /tmp/lorafleet-mutants.XXXXXX)}
echo "scratch clone: $SCRATCH (HEAD $(git rev-parse --short HEAD); uncommitted changes are not mutated)"
[ -d "$SCRATCH/.git" ] || git clone -q "$REPO" "$SCRATCH"
(cd "$SCRATCH" && bash scripts/setup.sh && .venv/bin/python -m pip install -q "$COSMIC_RAY")
mkdir -p docs/mutants

for t in "${targets[@]}"; do
  IFS='|' read -r module tests timeout <<<"${TARGETS[$t]}"
  config="$SCRATCH/.mutants-$t.toml"
  session="$SCRATCH/.mutants-$t.sqlite"
  cat > "$config" <<EOF
[cosmic-ray]
module-path = "$module"
timeout = $timeout
excluded-modules = []
test-command = "$SCRATCH/.venv/bin/python -m pytest -x -q -p no:cacheprovider -p no:randomly $tests"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = ['core/(?!($KEEP)$)']
EOF
  echo "== $t: $module, tests: $tests"
  (
    cd "$SCRATCH"
    . .venv/bin/activate
    if [ ! -f "$session" ] || [ -n "${MUTANTS_FRESH:-}" ]; then  # else: resume, keeping its results
      git checkout -q -- "$module"  # a run cut short may have left its mutant in place
      cosmic-ray init "$config" "$session" --force
      cr-filter-operators "$session" "$config"
      cr-filter-pragma "$session"  # lines marked `# pragma: no mutate` (log and error wording)
    fi
    cosmic-ray exec "$config" "$session"
    git diff --quiet || { echo "the scratch tree was left mutated" >&2; exit 1; }
    python "$REPO/scripts/mutants_report.py" "$session" "$t" > "$REPO/docs/mutants/$t.txt"
  )
  tail -n 3 "docs/mutants/$t.txt"
done
echo "survivors: docs/mutants/*.txt (scratch clone $SCRATCH kept; MUTANTS_DIR=$SCRATCH reuses it)"
