"""A real S3 endpoint for tests: moto's server mode in a subprocess on a free loopback port.

FlowOps talks to it with its ordinary S3 client (pyarrow's); boto3 is used here only to create
buckets and upload test objects. Import the fixture: `from tests.s3_server import s3_endpoint`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flowops.ray_client import free_port
from tests.conftest import S3_CREDENTIALS as CREDENTIALS  # also the session stack's


@dataclass
class S3Endpoint:
    url: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="flowops-test",
                            aws_secret_access_key="flowops-test-secret", region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")

    def env(self, uri: str) -> dict[str, str]:
        """What a process needs to use `uri` on this endpoint as its storage."""
        return {**CREDENTIALS, "FLOWOPS_STORAGE_URI": uri, "FLOWOPS_STORAGE_ENDPOINT_URL": self.url}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto_server on 127.0.0.1:<free port>, its AWS credentials in this process's environment."""
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    port = free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield S3Endpoint(url)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
