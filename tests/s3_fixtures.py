"""pytest plugin: a real S3 API for tests, served by moto's ThreadedMotoServer on a free port.

Registered for every test folder by the root conftest.py (pytest_plugins).
The session fixture
sets fake AWS credentials and region in the environment (restored afterwards) so obstore and
boto3 clients sign requests without looking for real ones; clients must be pointed at
``s3_server.endpoint`` with plain http allowed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from lorafleet.common.embedded import free_port  # (also imported from here by the store tests)

REGION = "us-east-1"
_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    region: str = REGION

    def _client(self):
        import boto3  # installed with moto[server]

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        self._client().create_bucket(Bucket=name)
        return name

    def obstore(self, bucket: str, prefix: str | None = None):
        """An obstore S3Store on a bucket of this server (for uploading test data)."""
        from obstore.store import S3Store

        return S3Store(bucket, prefix=prefix, endpoint=self.endpoint, region=self.region, client_options={"allow_http": True})

    def upload_folder(self, local_dir: Path, bucket: str, key_prefix: str) -> list[str]:
        """Upload every file directly in `local_dir` under `key_prefix/`; returns the keys written."""
        import obstore

        store = self.obstore(bucket)
        keys = []
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                key = f"{key_prefix.strip('/')}/{path.name}"
                obstore.put(store, key, path.read_bytes())
                keys.append(key)
        return keys


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_REGION", REGION)
            env.setenv("AWS_DEFAULT_REGION", REGION)
            for leaked in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                env.delenv(leaked, raising=False)
            yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for one test."""
    return s3_server.create_bucket(f"test-bucket-{next(_bucket_numbers)}")
