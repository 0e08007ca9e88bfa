"""Each engine knob is declared once (its LORAFLEET_* variable: type, default, help) and reaches
the engine from the command line: every EngineConfig field but the model folder is a knob, the
engine's flags are derived from the fields, and flag / variable / default reach the config."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from lorafleet.adapter_store.config import AdapterStoreConfig
from lorafleet.common import settings
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.scheduler import SchedulerConfig
from lorafleet.engine.serving.config import EngineServiceConfig
from lorafleet.ingest.config import IngestConfig


def _parse(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser()
    EngineServiceConfig.add_arguments(parser)
    return EngineServiceConfig.from_args(parser.parse_args(argv), model_dir="m").engine


def test_every_config_field_is_a_declared_knob_with_its_default():
    for config in (EngineConfig, EngineServiceConfig, IngestConfig, AdapterStoreConfig):
        for f in fields(config):
            if f.name in ("model_dir", "engine", "adapters_root"):  # --model (the demo's when unset); the engine's own knobs
                continue
            var = settings.ENV_VARS[f.metadata["env"]]  # KeyError: a field without a knob
            assert f.default is MISSING or f.default == var.default, (config.__name__, f.name)


def test_service_knobs_reach_their_configs(monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOT_WINDOW_S", "3.5")  # read when the flags are made
    parser = argparse.ArgumentParser()
    IngestConfig.add_arguments(parser)
    ingest = IngestConfig.from_args(parser.parse_args(["--ingest-max-batch", "9", "--group-id", "g"]), model_dir="m")
    assert (ingest.max_batch, ingest.group_id, ingest.hot_window_s) == (9, "g", 3.5)
    parser = argparse.ArgumentParser()
    EngineServiceConfig.add_arguments(parser)
    service = EngineServiceConfig.from_args(parser.parse_args(["--engine-max-inflight", "3", "--store-address", "h:1"]),
                                            model_dir="m")
    assert (service.max_inflight, service.store_address, service.engine.model_dir) == (3, "h:1", "m")


def test_flags_variables_and_defaults_reach_the_config(monkeypatch):
    assert _parse([]) == EngineConfig(model_dir="m")
    config = _parse(["--max-num-seqs", "7", "--cuda-graphs", "0", "--decode-steps-per-prefill", "2",
                     "--max-adapter-slots", "9", "--elementwise-ops", "torch", "--random-weights-seed", "3"])
    assert (config.max_num_seqs, config.cuda_graphs, config.decode_steps_per_prefill) == (7, False, 2)
    assert (config.max_adapter_slots, config.elementwise_ops, config.random_weights_seed) == (9, "torch", 3)
    monkeypatch.setenv("LORAFLEET_CPU_POOL_BYTES", "12345")
    monkeypatch.setenv("LORAFLEET_MAX_NUM_SEQS", "11")
    config = _parse(["--max-num-seqs", "5"])
    assert (config.cpu_pool_bytes, config.max_num_seqs) == (12345, 5)  # the flag wins over the variable


def test_the_scheduler_declares_no_defaults_of_its_own():
    assert {f.name for f in fields(SchedulerConfig) if f.default is MISSING} >= {"max_num_seqs", "max_batched_tokens"}


def test_store_knobs_reach_its_config_from_flags_and_the_environment():
    environ = {"LORAFLEET_MODEL": "m", "LORAFLEET_ADAPTERS": "file:///a", "LORAFLEET_STORE_FETCH_ATTEMPTS": "7",
               "LORAFLEET_S3_ALLOW_HTTP": "1", "LORAFLEET_STORE_SPILL_DIR": "/tmp/spill"}
    config = AdapterStoreConfig.from_env_and_args(environ=environ, memory_bytes=4 << 30, shm_dir="/tmp/shm")
    assert (config.memory_bytes, str(config.shm_dir), str(config.spill_dir)) == (4 << 30, "/tmp/shm", "/tmp/spill")
    assert (config.retry.attempts, config.s3.allow_http) == (7, True)
    assert AdapterStoreConfig.from_env_and_args(environ={**environ, "LORAFLEET_STORE_SPILL_DIR": ""}).spill_dir is None
    with pytest.raises(TypeError, match="memory_byte"):
        AdapterStoreConfig.from_env_and_args(environ=environ, memory_byte=1)
