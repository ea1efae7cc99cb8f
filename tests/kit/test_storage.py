"""Object storage: the local folder and S3 (a real seaweedfs S3 server the test starts) behave alike."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.seaweed import seaweedfs
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.storage import LocalObjectStore, ObjectStore, S3ObjectStore


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    identity = {"name": "test", "credentials": [{"accessKey": "test", "secretKey": "testsecret"}],
                "actions": ["Admin", "Read", "Write", "List"]}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="testsecret")

    def create_bucket(endpoint: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="tuneforge")

    with seaweedfs(tmp_path_factory.mktemp("seaweed"), [identity], create_bucket) as endpoint:
        yield endpoint


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


def test_a_folder_removed_while_it_is_listed_is_skipped(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A running job's listing races the trainer pruning its oldest checkpoint: the folder goes between
    being seen and being read. The listing is what is there, never FileNotFoundError (an INTERNAL)."""
    import shutil

    store = LocalObjectStore(tmp_path / "objects")
    for step in (10, 20):
        store.put_bytes(f"jobs/acme/job_1/checkpoints/checkpoint-{step}/model.bin", b"m")
    scandir = os.scandir

    def pruning(path: str) -> Iterator[os.DirEntry[str]]:
        if str(path).endswith("checkpoint-10"):
            shutil.rmtree(path)  # the prune, just as the listing reaches the folder
        return scandir(path)

    monkeypatch.setattr(os, "scandir", pruning)
    assert store.list_keys("jobs/acme/job_1/") == ["jobs/acme/job_1/checkpoints/checkpoint-20/model.bin"]
    assert [o.key for o in store.list_objects("jobs/acme/")] == [
        "jobs/acme/job_1/checkpoints/checkpoint-20/model.bin"]
