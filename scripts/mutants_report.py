"""Summary of one Cosmic Ray session (scripts/mutants.sh): counts, then every surviving mutant
with its place, operator and the source line it changed.

    python scripts/mutants_report.py SESSION.sqlite TARGET > docs/mutants/TARGET.txt
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome


def main(session: str, target: str) -> int:
    with use_db(session, WorkDB.Mode.open) as db:
        results = dict(db.results)
        items = list(db.work_items)
    outcomes: Counter = Counter()
    survivors = []
    for item in items:
        result = results.get(item.job_id)
        if result is None:
            outcomes["pending"] += 1
        elif result.worker_outcome == WorkerOutcome.SKIPPED:
            outcomes["skipped (operator or pragma filtered)"] += 1
        elif result.test_outcome == TestOutcome.SURVIVED:
            outcomes["survived"] += 1
            survivors.append(item)
        else:  # killed, incompetent (the mutant did not even import), or the worker's own failure
            outcomes[(result.test_outcome or result.worker_outcome).value] += 1
    print(f"target {target}")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    for item in survivors:
        for mutation in item.mutations:
            line = mutation.start_pos[0]
            source = Path(mutation.module_path).read_text().splitlines()[line - 1].strip()
            print(f"SURVIVED {mutation.module_path}:{line} {mutation.operator_name} #{mutation.occurrence}: {source}")
    tested = sum(count for outcome, count in outcomes.items() if outcome in ("killed", "survived"))
    print(f"killed {outcomes['killed']} of {tested} tested mutants; {outcomes['survived']} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
