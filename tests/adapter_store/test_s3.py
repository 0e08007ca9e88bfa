"""s3:// adapter roots against a real S3 API (moto's server), and transient storage failures."""

from __future__ import annotations

import pytest
from moto.server import ThreadedMotoServer

from lorafleet.adapter_store.errors import AdapterNotFoundError, AdapterStoreUnavailable, InvalidAdapterError
from lorafleet.adapter_store.retry import RetryPolicy
from lorafleet.adapter_store.store import AdapterStore
from lorafleet.common.adapter_root import S3Options
from tests.s3_fixtures import S3Server, free_port

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)


def s3_store(root: str, spec, s3: S3Options, *, max_adapter_bytes: int = 1 << 20) -> AdapterStore:
    return AdapterStore.from_root(
        root, spec, memory_bytes=1 << 24, max_adapter_bytes=max_adapter_bytes, negative_ttl_s=5.0, s3=s3, retry=FAST_RETRY
    )


async def test_adapters_from_an_s3_root(s3_server, s3_bucket, spec, adapter_root, broken_adapter_kinds):
    adapter_root.add("tenant-a/good", like="r8_all")
    broken_adapter_kinds["pickle_only"][0](adapter_root, "tenant-a/pickled")
    broken_adapter_kinds["wrong_shapes"][0](adapter_root, "tenant-a/misshapen")
    for adapter_id in ("tenant-a/good", "tenant-a/pickled", "tenant-a/misshapen"):
        s3_server.upload_folder(adapter_root.path / adapter_id, s3_bucket, f"fleet/v1/{adapter_id}")
    store = s3_store(f"s3://{s3_bucket}/fleet/v1", spec, S3Options(endpoint=s3_server.endpoint, allow_http=True))

    weights = await store.get("tenant-a/good")
    assert weights.config.rank == 8 and len(weights.config.targets) == 2 * 7
    assert store.source.stats.gets == 2
    with pytest.raises(InvalidAdapterError, match="pickle files are never loaded"):
        await store.get("tenant-a/pickled")
    assert store.source.stats.gets == 2  # the .bin was listed, never read
    with pytest.raises(InvalidAdapterError, match="shape"):
        await store.get("tenant-a/misshapen")
    for missing in ("tenant-a/absent", "tenant-a", "fleet"):
        with pytest.raises(AdapterNotFoundError):
            await store.get(missing)


async def test_s3_oversize_is_rejected_from_the_listing(s3_server, s3_bucket, spec, adapter_root):
    adapter_root.add("big", like="r8_all")
    s3_server.upload_folder(adapter_root.path / "big", s3_bucket, "big")
    limit = adapter_root.weights_size("big") - 1
    store = s3_store(f"s3://{s3_bucket}", spec, S3Options(endpoint=s3_server.endpoint, allow_http=True), max_adapter_bytes=limit)
    with pytest.raises(InvalidAdapterError, match="LORAFLEET_STORE_MAX_ADAPTER_BYTES"):
        await store.get("big")
    assert store.source.stats.lists == 1 and store.source.stats.gets == 0


async def test_endpoint_from_the_usual_aws_variable(s3_server, s3_bucket, spec, adapter_root, monkeypatch):
    adapter_root.add("env/adapter")
    s3_server.upload_folder(adapter_root.path / "env/adapter", s3_bucket, "env/adapter")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = s3_store(f"s3://{s3_bucket}", spec, S3Options(allow_http=True))  # no LORAFLEET_S3_ENDPOINT override
    assert (await store.get("env/adapter")).config.rank == 4


async def test_unreachable_storage_is_transient_retried_and_never_cached(s3_server, spec, adapter_root):
    port = free_port()  # nothing listens here yet
    endpoint = f"http://127.0.0.1:{port}"
    store = s3_store("s3://later-bucket/p", spec, S3Options(endpoint=endpoint, allow_http=True, connect_timeout_s=2.0))
    for attempt in (1, 2):
        with pytest.raises(AdapterStoreUnavailable, match="storage error") as info:
            await store.get("t/a")
        assert not isinstance(info.value, AdapterNotFoundError)
        assert store.source.stats.lists == FAST_RETRY.attempts * attempt  # retried, then asked again
    # Storage comes back: the very next request succeeds (no negative answer was remembered).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        late = S3Server(endpoint=endpoint)
        late.create_bucket("later-bucket")
        adapter_root.add("t/a")
        late.upload_folder(adapter_root.path / "t/a", "later-bucket", "p/t/a")
        assert (await store.get("t/a")).config.rank == 4
    finally:
        server.stop()
