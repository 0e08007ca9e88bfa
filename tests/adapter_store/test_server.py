"""The node's store process over TCP with real clients: shared downloads, files in the shared
folder written once and deleted on eviction, errors over the wire, and the process lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import torch

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.adapter_store.config import AdapterStoreConfig, parse_address
from lorafleet.adapter_store.errors import AdapterNotFoundError, AdapterStoreUnavailable, InvalidAdapterError
from lorafleet.adapter_store.retry import RetryPolicy
from lorafleet.adapter_store.server import run_adapter_store
from lorafleet.adapter_store.shm import FILE_SUFFIX
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.s3_fixtures import free_port

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)


@contextlib.asynccontextmanager
async def running_store(adapter_root, model_dir, shm_dir: Path, **env: str):
    environ = {f"LORAFLEET_{k}": v for k, v in env.items()}
    config = AdapterStoreConfig.from_env_and_args(
        model_dir=model_dir, adapters_root=f"file://{adapter_root.path}", address="127.0.0.1:0", shm_dir=shm_dir, environ=environ
    )
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_adapter_store(config, stop=stop, on_ready=ready.set_result))
    address = await asyncio.wait_for(asyncio.shield(ready), 30)
    try:
        yield address
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def adapter_files(shm_dir: Path) -> list[Path]:
    return sorted(p for p in shm_dir.iterdir() if p.name.endswith(FILE_SUFFIX))


async def test_two_clients_share_one_download_and_one_file(adapter_root, tiny_model_dir, spec, peft_adapters, tmp_path):
    adapter_root.add("tenant-a/sql-v3", like="r8_all")
    shm = tmp_path / "shm"
    async with running_store(adapter_root, tiny_model_dir, shm) as address:
        first, second = AdapterStoreClient(address, spec), AdapterStoreClient(address, spec)
        results = await asyncio.gather(*[c.get("tenant-a/sql-v3") for c in (first, second) for _ in range(4)])
        expected = load_peft_adapter_dir(peft_adapters["r8_all"], spec)
        for weights in results:
            assert weights.config == expected.config
            for key in expected.a:
                assert weights.a[key].equal(expected.a[key]) and weights.b[key].equal(expected.b[key])
        health = await first.health()
        assert health.fetches == 1 and health.adapters == 1 and health.loading == 0
        files = adapter_files(shm)
        assert len(files) == 1 and files[0].name.startswith("tenant-a~sql-v3-")
        assert health.used_bytes == files[0].stat().st_size
        assert [p for p in shm.iterdir() if p.name.endswith(".tmp")] == []  # written via rename only
        path = await second.get_path("tenant-a/sql-v3")
        assert path == files[0]
        await first.close()
        await second.close()
    assert adapter_files(shm) == []  # the store deletes its files when it stops


async def test_errors_over_the_wire(adapter_root, tiny_model_dir, spec, broken_adapter_kinds, tmp_path):
    broken_adapter_kinds["nan_values"][0](adapter_root, "bad/nan")
    broken_adapter_kinds["pickle_only"][0](adapter_root, "bad/pickle")
    async with running_store(adapter_root, tiny_model_dir, tmp_path / "shm") as address:
        client = AdapterStoreClient(address, spec, retry=FAST_RETRY)
        with pytest.raises(AdapterNotFoundError, match="ghost"):
            await client.get("ghost")
        with pytest.raises(InvalidAdapterError, match="NaN"):
            await client.get("bad/nan")
        with pytest.raises(InvalidAdapterError, match="pickle"):
            await client.get("bad/pickle")
        with pytest.raises(ValueError, match="'..'"):
            await client.get("a/../b")  # refused by the client before sending
        # Bypass the client's own check: the store refuses a malformed id too.
        host, port = parse_address(address)
        reader, writer = await asyncio.open_connection(host, port)
        for line, status, words in (
            (b'{"op":"get","adapter":"a//b"}\n', "bad_request", "empty"),
            (b"not json\n", "bad_request", "malformed"),
            (b'{"op":"delete","adapter":"a"}\n', "bad_request", "op"),
            (b'{"op":"get"}\n', "bad_request", "adapter"),
            (b'{"op":"health"}\n', "ok", None),
        ):
            writer.write(line)
            reply = json.loads(await reader.readline())
            assert reply["status"] == status, reply
            if words:
                assert words in reply["message"]
        assert reply["health"]["fetches"] == 3  # ghost, nan, pickle: the bad requests reached storage once each
        writer.close()
        with pytest.raises(AdapterNotFoundError):
            await client.get("ghost")  # negative cache: no new fetch
        assert (await client.health()).fetches == 3
        await client.close()


async def test_prefetch_then_get_reads_storage_once(adapter_root, tiny_model_dir, spec, tmp_path):
    adapter_root.add("warm/me")
    async with running_store(adapter_root, tiny_model_dir, tmp_path / "shm") as address:
        client = AdapterStoreClient(address, spec)
        await client.prefetch("warm/me")
        await client.prefetch("warm/me")
        for _ in range(500):
            health = await client.health()
            if health.adapters == 1:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("warm/me")).config.rank == 4
        assert (await client.health()).fetches == 1
        await client.close()


async def test_eviction_deletes_files_and_a_late_reader_asks_again(adapter_root, tiny_model_dir, spec, tmp_path):
    for name in "abc":
        adapter_root.add(f"e/{name}")
    shm = tmp_path / "shm"
    # Learn one canonical file's size, then allow two of them.
    async with running_store(adapter_root, tiny_model_dir, tmp_path / "probe") as address:
        probe = AdapterStoreClient(address, spec)
        one = (await probe.get_path("e/a")).stat().st_size
        await probe.close()
    budget = str(2 * one + one // 2)
    async with running_store(
        adapter_root, tiny_model_dir, shm, STORE_MEMORY_BYTES=budget, STORE_MAX_ADAPTER_BYTES=str(adapter_root.weights_size("e/a"))
    ) as address:
        client = AdapterStoreClient(address, spec)
        stale_path = await client.get_path("e/a")
        await client.get("e/b")
        assert stale_path.exists() and len(adapter_files(shm)) == 2
        await client.get("e/c")  # over budget: e/a (least recently used) is evicted and its file deleted
        assert not stale_path.exists()
        assert [p.name.split("-")[0] for p in adapter_files(shm)] == ["e~b", "e~c"]
        weights = await client.get("e/a")  # fetched again into a new file
        assert weights.config.rank == 4
        health = await client.health()
        assert health.fetches == 4 and health.adapters == 2 and health.used_bytes <= int(budget)
        await client.close()


async def test_stale_files_of_a_previous_run_are_removed(adapter_root, tiny_model_dir, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / f"old-123456789abc.7{FILE_SUFFIX}").write_bytes(b"x" * 100)
    (shm / f".half-written{FILE_SUFFIX}.42.tmp").write_bytes(b"x")
    (shm / "someone-elses-file.txt").write_text("kept")
    async with running_store(adapter_root, tiny_model_dir, shm):
        assert sorted(p.name for p in shm.iterdir()) == ["someone-elses-file.txt"]


async def test_client_without_a_store_is_unavailable_after_bounded_retries(spec):
    client = AdapterStoreClient(f"127.0.0.1:{free_port()}", spec, retry=FAST_RETRY)
    with pytest.raises(AdapterStoreUnavailable, match="unreachable"):
        await client.get("any/adapter")
    with pytest.raises(AdapterStoreUnavailable):
        await client.health()


def test_config_from_env_and_args(tmp_path):
    environ = {
        "LORAFLEET_MODEL": "/models/llama",
        "LORAFLEET_ADAPTERS": "s3://bucket/adapters",
        "LORAFLEET_STORE_MEMORY_BYTES": "4096",
        "LORAFLEET_STORE_MAX_ADAPTER_BYTES": "1024",
        "LORAFLEET_S3_ENDPOINT": "http://minio:9000",
        "LORAFLEET_S3_ALLOW_HTTP": "true",
        "LORAFLEET_STORE_FETCH_ATTEMPTS": "7",
    }
    config = AdapterStoreConfig.from_env_and_args(environ=environ, address="0.0.0.0:7171")
    assert config.model_dir == Path("/models/llama") and config.adapters_root == "s3://bucket/adapters"
    assert config.address == "0.0.0.0:7171" and config.memory_bytes == 4096 and config.max_adapter_bytes == 1024
    assert config.s3.endpoint == "http://minio:9000" and config.s3.allow_http is True and config.retry.attempts == 7
    with pytest.raises(ValueError, match="LORAFLEET_STORE_MEMORY_BYTES"):
        AdapterStoreConfig.from_env_and_args(environ={**environ, "LORAFLEET_STORE_MEMORY_BYTES": "100"})
    with pytest.raises(ValueError, match="LORAFLEET_MODEL"):
        AdapterStoreConfig.from_env_and_args(environ={k: v for k, v in environ.items() if k != "LORAFLEET_MODEL"})
    with pytest.raises(ValueError, match="host:port"):
        AdapterStoreConfig.from_env_and_args(environ=environ, address="7070")
    assert parse_address("[::1]:7070") == ("::1", 7070)


async def test_evicted_adapters_spill_to_disk_and_come_back_without_a_download(adapter_root, tiny_model_dir, spec, tmp_path):
    for name in "abcd":
        adapter_root.add(f"s/{name}")
    async with running_store(adapter_root, tiny_model_dir, tmp_path / "probe") as address:
        probe = AdapterStoreClient(address, spec)
        one = (await probe.get_path("s/a")).stat().st_size
        await probe.close()
    shm, spill = tmp_path / "shm", tmp_path / "spill"
    async with running_store(
        adapter_root, tiny_model_dir, shm, STORE_MEMORY_BYTES=str(2 * one + one // 2),
        STORE_MAX_ADAPTER_BYTES=str(adapter_root.weights_size("s/a")), STORE_SPILL_DIR=str(spill),
        STORE_SPILL_BYTES=str(2 * one + one // 2),
    ) as address:
        client = AdapterStoreClient(address, spec)
        first = await client.get("s/a")
        for name in "bcd":
            await client.get(f"s/{name}")  # memory holds two: a, then b, are evicted to disk
        assert len(adapter_files(shm)) == 2
        assert sorted(p.name.split("-")[0] for p in spill.glob("*.spill")) == ["s~a", "s~b"]
        again = await client.get("s/a")  # from the spill: no new download
        assert (await client.health()).fetches == 4
        assert all(torch.equal(again.a[k], first.a[k]) and torch.equal(again.b[k], first.b[k]) for k in first.a)
        await client.get("s/c")  # c spilled when a came back; the disk budget (two files) drops b, the oldest
        assert (await client.health()).fetches == 4
        assert len(list(spill.glob("*.spill"))) <= 2
        await client.close()
    assert not list(spill.glob("*.spill")), "the spill is cleared when the store stops"
