"""bench/tp_comm.py runs and reports what the comm model implies (the model itself is checked
against the real collectives in test_distributed.py)."""

from __future__ import annotations

import json

from lorafleet.bench import tp_comm
from lorafleet.bench.tp_comm_model import per_token_bytes
from lorafleet.engine.tp.shard_adapters import Scheme


def test_world_of_one_communicates_nothing():
    spec = tp_comm.spec_of("7b")
    for scheme in Scheme:
        assert per_token_bytes(spec, 1, scheme, 8) == {"lora": 0, "base": 0, "lora_collectives_per_layer": {
            Scheme.SLORA: 4, Scheme.REPLICATED_A: 2, Scheme.GATHER_OUTPUTS: 2, Scheme.FUSED: 0}[scheme]}


def test_bench_writes_its_tables(tmp_path):
    tp_comm.main(["--out", str(tmp_path), "--worlds", "2", "4", "--ranks", "8", "64"])
    rows = json.loads((tmp_path / "comm.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * len(Scheme)
    by = {(r["world"], r["rank"], r["scheme"]): r for r in rows}
    for world in (2, 4):
        for rank in (8, 64):
            slora, gather = by[(world, rank, "slora")], by[(world, rank, "gather_outputs")]
            # S-LoRA's point: rank-sized collectives, far below the activation-sized ones
            assert slora["lora_bytes_per_token"] * 10 < gather["lora_bytes_per_token"]
            assert slora["adapter_mb_per_rank"] == min(by[(world, rank, s.value)]["adapter_mb_per_rank"] for s in Scheme)
    assert "No GPU numbers" in (tmp_path / "comm.md").read_text()
