"""Getting results out: GetJobArtifacts and the downloads behind its URLs.

Unit: the signed download tokens (forged, edited and expired ones refused) and Range parsing.
Integration: the real jobs component served on port 0 (real nats-server, SQLite) over local storage, with a
job's outputs placed in storage as the worker lays them out and the job marked SUCCEEDED in its table (as
tests/jobs/test_fencing.py does); listing, the platform's own download server (exact bytes, Range resume,
refusals, another organization NOT_FOUND), the CLI download (checksums, resume, mismatch), and the same
against a real S3 server (seaweedfs) with presigned URLs that expire.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import pytest
from tuneforge.v1 import artifact_pb2, identity_pb2, job_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import NotFound, TuneForgeClient, Unavailable
from services.jobs.artifacts import ArtifactCatalog
from services.jobs.component import JobsComponent
from services.jobs.downloads import DownloadSigner, TokenRefused, parse_range
from services.jobs.models import JobRow
from services.jobs.settings import JobSettings
from services.kit.identity import IdentityStore
from services.kit.runtime import Runtime, serve
from tests.seaweed import seaweedfs
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.ids import new_id
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore, ObjectStore, S3ObjectStore

K = artifact_pb2.ArtifactKind
ORG, OTHER = "acme", "bravo"

# -- tokens ------------------------------------------------------------------------------------------------


def test_a_valid_token_names_its_key_until_it_expires() -> None:
    signer = DownloadSigner([b"k" * 32])
    token = signer.sign("jobs/acme/job_1/adapter/a.bin", expires_at=1_000)
    assert signer.verify(token, now=999) == "jobs/acme/job_1/adapter/a.bin"
    with pytest.raises(TokenRefused, match="expired"):
        signer.verify(token, now=1_000)
    # Rotation: an old key still verifies while a new one signs.
    assert DownloadSigner([b"n" * 32, b"k" * 32]).verify(token, now=0) == "jobs/acme/job_1/adapter/a.bin"


def test_forged_and_edited_tokens_are_refused() -> None:
    import base64
    import json

    signer = DownloadSigner([b"k" * 32])
    token = signer.sign("jobs/acme/job_1/adapter/a.bin", expires_at=2_000)
    payload, mac = token.split(".")
    forged = DownloadSigner([b"x" * 32]).sign("jobs/acme/job_1/adapter/a.bin", expires_at=2_000)

    def edited(claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"{body}.{mac}"

    for bad in (forged, edited({"k": "jobs/bravo/job_2/adapter/a.bin", "x": 2_000}),
                edited({"k": "jobs/acme/job_1/adapter/a.bin", "x": 9_999_999_999}),
                payload, f"{payload}.", f"{payload}.{mac[:-2]}", f"{payload}.!!!", "", "a.b.c", "x" * 5000):
        with pytest.raises(TokenRefused, match="invalid download link"):
            signer.verify(bad, now=0)
    with pytest.raises(ValueError):
        DownloadSigner([b"short"])


def test_range_headers() -> None:
    assert parse_range("bytes=0-", 10) == (0, 9)
    assert parse_range("bytes=4-", 10) == (4, 9)
    assert parse_range("bytes=2-5", 10) == (2, 5)
    assert parse_range("bytes=2-50", 10) == (2, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole file
    assert parse_range("items=0-1", 10) is None
    for bad in ("bytes=10-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 10)


# -- a served jobs component -------------------------------------------------------------------------------

@dataclass
class Served:
    address: str
    component: JobsComponent
    settings: JobSettings
    acme_key: str
    bravo_key: str

    @property
    def store(self) -> ObjectStore:
        return self.component.runtime.store

    def client(self, key: str | None = None) -> TuneForgeClient:
        return TuneForgeClient(self.address, api_key=key or self.acme_key)


@contextmanager
def served_jobs(settings: JobSettings) -> Iterator[Served]:
    """The jobs component behind a real gRPC server on its own thread and event loop, with an admin key of
    each organization."""
    built: list[JobsComponent] = []
    ready = threading.Event()
    box: dict[str, object] = {}

    def factory(runtime: Runtime) -> JobsComponent:
        built.append(JobsComponent(runtime, settings))
        return built[0]

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        try:
            await serve([factory], settings, name="jobs-artifacts-test",
                        on_ready=lambda a: (box.update(address=a), ready.set()), stop=stop)
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(60) and "error" not in box, box.get("error")
    identity = IdentityStore.open(settings.database_url_for("identity"))
    try:
        keys = [identity.create_key(org, f"t-{org}", identity_pb2.ROLE_ADMIN, timedelta(days=1), "tests")[1]
                for org in (ORG, OTHER)]
    finally:
        identity.close()
    try:
        yield Served(str(box["address"]), built[0], settings, *keys)
    finally:
        loop: asyncio.AbstractEventLoop = box["loop"]  # type: ignore[assignment]
        loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
        thread.join(30)


@dataclass
class StoredJob:
    id: str
    files: dict[str, bytes]  # key -> content, as stored


def store_job(served: Served, *, state: int = job_pb2.JOB_STATE_SUCCEEDED, merged: bool = True) -> StoredJob:
    """A job of ORG with outputs laid out as the worker uploads them (trainer_worker/agent.py and
    checkpointing.py): adapter/, merged/, two complete checkpoints and one half-uploaded."""
    job_id = new_id("job")
    prefix = f"jobs/{ORG}/{job_id}"
    big = os.urandom(3 * 1024 * 1024 + 17)
    files = {
        f"{prefix}/adapter/adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
        f"{prefix}/adapter/adapter_model.safetensors": big,
        f"{prefix}/adapter/nested/tokenizer.json": b"{}",
        f"{prefix}/checkpoints/checkpoint-10/model.bin": b"ten" * 100,
        f"{prefix}/checkpoints/checkpoint-10/COMPLETE": b"10",
        f"{prefix}/checkpoints/checkpoint-20/model.bin": b"twenty" * 100,
        f"{prefix}/checkpoints/checkpoint-20/COMPLETE": b"20",
        f"{prefix}/checkpoints/checkpoint-30/model.bin": b"half",  # no marker: still uploading
    }
    if merged:
        files[f"{prefix}/merged/model.safetensors"] = b"merged" * 1000
    for key, data in files.items():
        served.store.put_bytes(key, data)
    output = job_pb2.JobOutput(adapter_uri=served.store.uri(f"{prefix}/adapter"),
                               merged_model_uri=served.store.uri(f"{prefix}/merged") if merged else "")
    spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
    with served.component.manager.db.session() as s:
        s.add(JobRow(id=job_id, organization=ORG, name=job_id, spec=spec.SerializeToString(), state=state,
                     revision=3, request_hash="", output=output.SerializeToString(), attempt=1,
                     worker_id="w1"))
    return StoredJob(job_id, files)


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_listing(artifacts: list[artifact_pb2.JobArtifact], job: StoredJob, merged: bool = True) -> None:
    prefix = f"jobs/{ORG}/{job.id}"
    names = ["adapter", *(["merged"] if merged else []), "checkpoint-10", "checkpoint-20"]
    assert [a.name for a in artifacts] == names
    kinds = [K.ARTIFACT_KIND_ADAPTER, *([K.ARTIFACT_KIND_MERGED_MODEL] if merged else []),
             K.ARTIFACT_KIND_CHECKPOINT, K.ARTIFACT_KIND_CHECKPOINT]
    assert [a.kind for a in artifacts] == kinds
    assert [a.step for a in artifacts][-2:] == [10, 20]
    for artifact in artifacts:
        checkpoint = artifact.kind == K.ARTIFACT_KIND_CHECKPOINT
        folder = f"checkpoints/{artifact.name}" if checkpoint else artifact.name
        expected = {k[len(f"{prefix}/{folder}/"):]: v for k, v in job.files.items()
                    if k.startswith(f"{prefix}/{folder}/") and not k.endswith("/COMPLETE")}
        assert [f.path for f in artifact.files] == sorted(expected)
        for f in artifact.files:
            assert f.size_bytes == len(expected[f.path]) and f.sha256 == sha(expected[f.path]), f.path
            assert f.expire_time.seconds > time.time()
            assert "/tmp" not in f.download_url and "file:" not in f.download_url
        assert artifact.size_bytes == sum(len(v) for v in expected.values())


@pytest.fixture
def local(kit_settings: KitSettings) -> Iterator[Served]:
    with served_jobs(JobSettings(**kit_settings.model_dump())) as served:
        yield served


def test_artifacts_are_listed_and_downloaded_from_the_platform(local: Served) -> None:
    job = store_job(local)
    with local.client() as acme:
        artifacts = acme.get_job_artifacts(job.id)
        check_listing(artifacts, job)
        adapter = artifacts[0]
        # The checksums are kept beside the job's outputs; a second listing reads them, not the files.
        manifest = f"jobs/{ORG}/{job.id}/manifests/adapter.json"
        assert local.store.exists(manifest)
        assert [f.sha256 for f in acme.get_job_artifacts(job.id, [K.ARTIFACT_KIND_ADAPTER])[0].files] == \
            [f.sha256 for f in adapter.files]
        # A rewritten file is hashed again, never served with its old checksum.
        key = f"jobs/{ORG}/{job.id}/adapter/adapter_config.json"
        local.store.put_bytes(key, b'{"r": 16}')
        again = acme.get_job_artifacts(job.id, [K.ARTIFACT_KIND_ADAPTER])[0]
        assert again.files[0].sha256 == sha(b'{"r": 16}') and again.files[0].size_bytes == 9
        job.files[key] = b'{"r": 16}'

        big = next(f for f in again.files if f.path == "adapter_model.safetensors")
        content = job.files[f"jobs/{ORG}/{job.id}/adapter/adapter_model.safetensors"]
        assert big.download_url.startswith(local.component.artifacts.base_url + "/v1/artifacts/")
        status, body, headers = fetch(big.download_url)
        assert status == 200 and body == content and headers["Accept-Ranges"] == "bytes"
        # Resuming: the rest of the file from a byte offset.
        status, body, headers = fetch(big.download_url, {"Range": "bytes=1000000-"})
        assert status == 206 and body == content[1_000_000:]
        assert headers["Content-Range"] == f"bytes 1000000-{len(content) - 1}/{len(content)}"
        status, _, _ = fetch(big.download_url, {"Range": f"bytes={len(content)}-"})
        assert status == 416

        # Refused: an edited token, a forged one, an expired one; nothing outside the job outputs.
        base, token = big.download_url.rsplit("/", 1)
        payload, mac = token.split(".")
        for bad in (f"{payload[:-2]}AA.{mac}", DownloadSigner([b"z" * 32]).sign(
                f"jobs/{ORG}/{job.id}/adapter/adapter_model.safetensors", int(time.time()) + 60)):
            status, body, _ = fetch(f"{base}/{bad}")
            assert (status, body) == (403, b"invalid download link\n")
        short = acme.get_job_artifacts(job.id, [K.ARTIFACT_KIND_CHECKPOINT], url_ttl_s=1)
        assert [a.name for a in short] == ["checkpoint-10", "checkpoint-20"]
        assert fetch(short[0].files[0].download_url)[0] == 200
        time.sleep(2.1)
        status, body, _ = fetch(short[0].files[0].download_url)
        assert status == 403 and body.startswith(b"download link expired")
        signer = local.component.artifacts.signer
        assert signer is not None
        for key in ("datasets/acme/ds_1/train.jsonl", f"jobs/{ORG}/../../../etc/passwd", "jobs/acme/none"):
            assert fetch(f"{base}/{signer.sign(key, int(time.time()) + 60)}")[0] == 404, key
        assert fetch(base.rsplit("/", 2)[0] + "/etc/passwd")[0] == 404

        # A url_ttl beyond the platform's default, or a bad kind, is the caller's error.
        with pytest.raises(Exception, match="url_ttl"):
            acme.get_job_artifacts(job.id, url_ttl_s=local.settings.download_url_ttl_s + 1)
        with pytest.raises(Exception, match=r"kinds\[0\]"):
            acme.get_job_artifacts(job.id, [K.ARTIFACT_KIND_UNSPECIFIED])

    # Another organization's job is NOT_FOUND, by id and by name, like one that does not exist.
    with local.client(local.bravo_key) as bravo:
        for ref in (job.id, "no-such-job"):
            with pytest.raises(NotFound):
                bravo.get_job_artifacts(ref)


def test_a_job_that_has_not_succeeded_lists_only_its_complete_checkpoints(local: Served) -> None:
    job = store_job(local, state=job_pb2.JOB_STATE_RUNNING)
    with local.client() as acme:
        assert [a.name for a in acme.get_job_artifacts(job.id)] == ["checkpoint-10", "checkpoint-20"]
        # The worker pruned checkpoint-10: it is gone from the listing, and so is its manifest.
        local.store.delete_prefix(f"jobs/{ORG}/{job.id}/checkpoints/checkpoint-10/")
        assert [a.name for a in acme.get_job_artifacts(job.id)] == ["checkpoint-20"]
        assert not local.store.exists(f"jobs/{ORG}/{job.id}/manifests/checkpoint-10.json")
        with pytest.raises(NotFound, match="has no adapter \\(it is RUNNING\\)"):
            acme.get_job_artifact(job.id)


def test_a_checkpoint_pruned_while_it_is_listed_is_left_out(local: Served,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer prunes its oldest checkpoint as it saves the next, at any moment: one that goes while the
    listing reads it is not there, as a listing a moment later would say; never an error (the console lists
    the artifacts at every CHECKPOINT_SAVED)."""
    job = store_job(local, state=job_pb2.JOB_STATE_RUNNING)
    prefix = f"jobs/{ORG}/{job.id}/checkpoints"
    local.store.put_bytes(f"{prefix}/checkpoint-40/model.bin", b"forty")
    local.store.put_bytes(f"{prefix}/checkpoint-40/COMPLETE", b"40")
    opened = local.store.open_object
    pruned: list[str] = []

    def pruning(key: str) -> BinaryIO:
        if key.startswith(f"{prefix}/checkpoint-10/") and not pruned:
            local.store.delete_prefix(f"{prefix}/checkpoint-10/")  # the trainer's prune, just then
            pruned.append(key)
        return opened(key)

    monkeypatch.setattr(local.store, "open_object", pruning)
    with local.client() as acme:
        assert [a.name for a in acme.get_job_artifacts(job.id)] == ["checkpoint-20", "checkpoint-40"]
        assert pruned

        # A file that is never there however often it is listed: a retryable UNAVAILABLE, not a 400.
        def missing(key: str) -> BinaryIO:
            raise FileNotFoundError(key)

        local.store.put_bytes(f"{prefix}/checkpoint-50/model.bin", b"fifty")
        local.store.put_bytes(f"{prefix}/checkpoint-50/COMPLETE", b"50")
        monkeypatch.setattr(local.store, "open_object", missing)
        with pytest.raises(Unavailable, match="kept changing while they were listed"):
            acme.get_job_artifacts(job.id)


def test_the_cli_downloads_the_adapter_with_checksums_and_resumes(local: Served, tmp_path: Path) -> None:
    job = store_job(local, merged=False)
    prefix = f"jobs/{ORG}/{job.id}/adapter/"
    adapter = {k[len(prefix):]: v for k, v in job.files.items() if k.startswith(prefix)}
    runner = CliRunner()
    env = {"TUNEFORGE_API_KEY": local.acme_key, "TUNEFORGE_ADDRESS": local.address}
    target = tmp_path / "out"

    result = runner.invoke(app, ["jobs", "download", job.id, str(target)], env=env)
    assert result.exit_code == 0, result.output
    assert "sha256 verified" in result.output
    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert got == adapter

    # Interrupted halfway: the .part file holds the first half; the next run fetches only the rest.
    big = target / "adapter_model.safetensors"
    content = big.read_bytes()
    big.unlink()
    (target / "adapter_model.safetensors.part").write_bytes(content[: len(content) // 2])
    result = runner.invoke(app, ["jobs", "download", job.id, str(target)], env=env)
    assert result.exit_code == 0, result.output
    assert big.read_bytes() == content and not (target / "adapter_model.safetensors.part").exists()

    # Bytes that are not the artifact's: refused, the .part file removed, exit 1.
    big.unlink()
    (target / "adapter_model.safetensors.part").write_bytes(b"\0" * len(content))
    result = runner.invoke(app, ["jobs", "download", job.id, str(target)], env=env)
    assert result.exit_code == 1
    assert "checksum mismatch for adapter_model.safetensors" in " ".join(result.output.split())
    assert not (target / "adapter_model.safetensors.part").exists() and not big.exists()

    # A checkpoint by step, the listing, and what a job does not have.
    result = runner.invoke(app, ["jobs", "download", job.id, str(tmp_path / "ck"), "--checkpoint", "20"],
                           env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "model.bin").read_bytes() == b"twenty" * 100
    assert not (tmp_path / "ck" / "COMPLETE").exists()
    result = runner.invoke(app, ["jobs", "artifacts", job.id], env=env)
    assert result.exit_code == 0 and sha(content) in result.output and "checkpoint-20" in result.output
    result = runner.invoke(app, ["jobs", "download", job.id, str(tmp_path / "m"), "--merged"], env=env)
    assert result.exit_code == 2 and "has no merged model" in result.output
    assert "created without --merge (spec.output.merge_adapter)" in " ".join(result.output.split())


# -- S3 ----------------------------------------------------------------------------------------------------

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


@pytest.mark.s3
def test_on_s3_the_urls_are_presigned_and_expire(kit_settings: KitSettings, s3_endpoint: str,
                                                 tmp_path: Path) -> None:
    settings = JobSettings(**{**kit_settings.model_dump(), "storage_url": f"s3://tuneforge/{tmp_path.name}",
                              "s3_endpoint_url": s3_endpoint})
    with served_jobs(settings) as served:
        assert isinstance(served.store, S3ObjectStore) and served.component.downloads is None
        job = store_job(served)
        with served.client() as acme:
            artifacts = acme.get_job_artifacts(job.id)
            check_listing(artifacts, job)
            big = next(f for f in artifacts[0].files if f.path == "adapter_model.safetensors")
            content = job.files[f"jobs/{ORG}/{job.id}/adapter/adapter_model.safetensors"]
            assert big.download_url.startswith(f"{s3_endpoint}/tuneforge/") and "X-Amz-Expires=3600" in \
                big.download_url
            status, body, _ = fetch(big.download_url)
            assert status == 200 and body == content
            status, body, _ = fetch(big.download_url, {"Range": "bytes=1000000-"})
            assert status == 206 and body == content[1_000_000:]

            # The CLI path: the adapter through the client, checksums verified.
            artifact = acme.download_artifact(job.id, tmp_path / "adapter")
            assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == content
            assert artifact.name == "adapter"

            short = acme.get_job_artifacts(job.id, [K.ARTIFACT_KIND_ADAPTER], url_ttl_s=1)[0].files[0]
            time.sleep(2.5)
            status, body, _ = fetch(short.download_url)
            assert status == 403 and b"expired" in body.lower(), body[:300]
        with served.client(served.bravo_key) as bravo, pytest.raises(NotFound):
            bravo.get_job_artifacts(job.id)


@pytest.mark.parametrize(("seconds", "nanos", "field"), [
    (1, 2_000_000_000, "url_ttl.nanos"), (0, -1_000_000_000, "url_ttl.nanos"), (-5, 0, "url_ttl"),
    (7200, 0, "url_ttl")])
def test_a_url_ttl_that_is_not_a_duration_or_out_of_range_is_refused_naming_it(
        tmp_path: Path, seconds: int, nanos: int, field: str) -> None:
    catalog = ArtifactCatalog(LocalObjectStore(tmp_path), default_ttl_s=3600)
    with pytest.raises(InvalidArgument) as caught:
        catalog.check_request([], seconds, nanos)
    assert [v.field for v in caught.value.violations] == [field]
    assert catalog.check_request([], 0, 0) == 3600 and catalog.check_request([], 1, 500) == 2
