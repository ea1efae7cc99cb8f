"""The REST/JSON face against the real platform: the gateway process `tuneforge up` starts, the real services
behind it, a real worker training the tiny model. Every route is called over HTTP at least once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf import json_format

from services.gateway.app import ACTIVE_STREAMS, create_app
from services.gateway.rules import all_routes
from services.platform.supervisor import Platform
from tests.auth import make_key
from tests.e2e.conftest import lora_spec
from tests.gateway.conftest import Api, error_reason, violations

pytestmark = pytest.mark.slow

FINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


async def settled_dataset(api: Api, ref: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        dataset = (await api.ok("GET", f"/v1/datasets/{ref}"))["dataset"]
        if dataset["state"] != "DATASET_STATE_PROCESSING":
            return dataset
        assert time.monotonic() < deadline, dataset
        await asyncio.sleep(0.3)


def queued_spec(model: Path, dataset: str) -> dict[str, Any]:
    """A job no CPU worker takes (it names a GPU type), so it stays QUEUED."""
    spec = lora_spec(model, dataset, epochs=1)
    spec.hardware.gpu_type = "nvidia-h100"
    return json_format.MessageToDict(spec)


async def upload(api: Api, data: Path, name: str, **params: str) -> tuple[int, Any]:
    return await api.call("POST", "/v1/datasets:upload", data=data.read_bytes(),  # noqa: ASYNC240 - tiny
                          params={"name": name, "filename": data.name, **params},
                          headers={"Content-Type": "application/octet-stream"})


async def test_every_route_over_http(platform: Platform, keys: dict[str, str], tiny_assets: tuple[Path, Path],
                                     hf_root: Path) -> None:
    model, data = tiny_assets
    reached: set[str] = set()
    async with Api(platform.http_url, keys["a"], reached) as api:
        # -- identity and audit --
        caller = (await api.ok("GET", "/v1/caller"))["caller"]
        assert caller["organization"] == "gw-a" and caller["role"] == "ROLE_ADMIN"
        made = await api.ok("POST", "/v1/api-keys",
                            {"name": "http-viewer", "role": "ROLE_VIEWER", "ttl": "3600s"})
        assert made["secret"] and made["apiKey"]["role"] == "ROLE_VIEWER"
        listed = await api.ok("GET", "/v1/api-keys", params={"pageSize": "100"})
        assert "http-viewer" in {k["name"] for k in listed["apiKeys"]}
        async with Api(platform.http_url, made["secret"]) as viewer:
            assert (await viewer.ok("GET", "/v1/caller"))["caller"]["role"] == "ROLE_VIEWER"
            revoked = await api.ok("POST", f"/v1/api-keys/{made['apiKey']['id']}:revoke")  # no body at all
            assert revoked["apiKey"]["revokeTime"]
            status, _ = await viewer.call("GET", "/v1/caller")
            assert status == 401
        audit = await api.ok("GET", "/v1/audit-events", params={"method": "CreateApiKey"})
        assert audit["events"] and all(e["method"].endswith("CreateApiKey") for e in audit["events"])

        # -- datasets: upload (raw body), validate, import, list, get, update, split, report, delete --
        status, uploaded = await upload(api, data, "chat", tokenizer=str(model.resolve()),
                                        **{"options.maxSamples": "200", "split.seed": "7"})
        assert status == 200, uploaded
        dataset = uploaded["dataset"]
        assert dataset["state"] == "DATASET_STATE_READY" and dataset["statistics"]["exampleCount"] == "200"
        assert dataset["options"]["maxSamples"] in (200, "200")
        status, checked = await api.call("POST", "/v1/datasets:validate", data=data.read_bytes(),
                                         params={"filename": "chat.jsonl"})
        assert status == 200, checked
        assert checked["report"]["valid"] and checked["report"]["examplesChecked"] == "240", checked
        imported = await api.ok("POST", "/v1/datasets", {
            "name": "imported", "source": {"huggingface_id": str(hf_root / "saved")}, "min_examples": 5})
        assert imported["dataset"]["state"] == "DATASET_STATE_PROCESSING"
        assert (await settled_dataset(api, "imported"))["state"] == "DATASET_STATE_READY"
        ready = await api.ok("GET", "/v1/datasets", params={"state": "DATASET_STATE_READY"})
        assert {d["name"] for d in ready["datasets"]} == {"chat", "imported"}
        assert (await api.ok("GET", f"/v1/datasets/{dataset['id']}"))["dataset"]["name"] == "chat"
        patched = await api.ok("PATCH", "/v1/datasets/chat",
                               {"description": "via HTTP", "updateMask": "description"})
        assert patched["dataset"]["description"] == "via HTTP"
        split = await api.ok("POST", "/v1/datasets/imported:split", {"split": {
            "trainFraction": 0.75, "validationFraction": 0.25, "testFraction": 0, "seed": 3}})
        counts = {s["kind"]: int(s["exampleCount"]) for s in split["dataset"]["splits"]}
        assert counts["DATASET_SPLIT_KIND_TRAIN"] == 30, counts
        report = await api.ok("GET", "/v1/datasets/chat/validation-report")
        assert report["report"]["valid"]
        assert await api.ok("DELETE", "/v1/datasets/imported") == {}
        status, gone = await api.call("GET", "/v1/datasets/imported")
        assert status == 404 and error_reason(gone) == "NOT_FOUND"

        # -- estimation --
        models = (await api.ok("GET", "/v1/models", params={"pageSize": "5"}))["models"]
        model_id = next(m["id"] for m in models if "/" in m["id"])
        requirements = await api.ok("GET", f"/v1/models/{model_id}:requirements",
                                    params={"adapter": "ADAPTER_TYPE_LORA"})
        assert requirements["model"]["id"] == model_id and requirements["memoryPerGpu"]
        options = (await api.ok("GET", "/v1/hardware"))["options"]
        gpu = max(options, key=lambda o: int(o["memoryBytes"]))["gpuType"]
        catalog_spec = {"baseModel": model_id, "method": "TRAINING_METHOD_SFT",
                        "adapter": "ADAPTER_TYPE_LORA", "hardware": {"gpuType": gpu}}
        sized = {"spec": catalog_spec, "tokensPerEpoch": "1000000"}
        estimate = (await api.ok("POST", "/v1/jobs:estimate", sized))["estimate"]
        assert int(estimate["memoryPerGpu"]["total"]) > 0 and estimate["gpuType"] == gpu
        fit = await api.ok("POST", "/v1/hardware:validate", sized)
        assert "requested" in fit
        cost = await api.ok("POST", "/v1/costs:estimate", sized)
        assert cost["projectedTotal"]
        plan = await api.ok("POST", "/v1/jobs:plan", {"spec": {**catalog_spec, "dataset": dataset["id"]}})
        assert plan["fits"] and int(plan["tokensPerEpoch"]) > 0

        # -- a job trained for real, followed over server-sent events --
        spec = json_format.MessageToDict(lora_spec(model, dataset["id"], epochs=1))
        created = await api.ok("POST", "/v1/jobs", {"name": "http-job", "spec": spec,
                                                     "requestId": str(uuid.uuid4())})
        job_id = created["job"]["id"]
        assert created["job"]["state"] == "JOB_STATE_QUEUED"
        watched = await api.events(f"/v1/jobs/{job_id}:watch")
        states = [data["job"]["state"] for name, data in watched if name == "message"]
        # The watch opens after CreateJob returned: a worker may have taken the job (PREPARING) by then.
        assert states[0] in ("JOB_STATE_QUEUED", "JOB_STATE_PREPARING", "JOB_STATE_RUNNING")
        assert states[-1] == "JOB_STATE_SUCCEEDED"
        assert "JOB_STATE_RUNNING" in states
        assert (await api.ok("GET", f"/v1/jobs/{job_id}"))["job"]["state"] == "JOB_STATE_SUCCEEDED"
        succeeded = await api.ok("GET", "/v1/jobs", params=[("states", "JOB_STATE_SUCCEEDED"),
                                                            ("states", "JOB_STATE_FAILED")])
        assert [j["id"] for j in succeeded["jobs"]] == [job_id]
        assert (await api.ok("GET", f"/v1/jobs/{job_id}/events"))["events"]
        artifacts = (await api.ok("GET", f"/v1/jobs/{job_id}/artifacts"))["artifacts"]
        assert any(a["kind"] == "ARTIFACT_KIND_ADAPTER" for a in artifacts), artifacts
        checkpoints = await api.ok("GET", f"/v1/jobs/{job_id}/checkpoints")
        assert isinstance(checkpoints.get("checkpoints", []), list)
        evaluation = await api.ok("GET", f"/v1/jobs/{job_id}/evaluation")
        assert evaluation["job"] == job_id
        assert (await api.ok("GET", "/v1/workers"))["workers"]
        assert (await api.ok("GET", "/v1/pools"))["pools"]
        usage = await api.ok("GET", "/v1/usage", params={"period": "USAGE_PERIOD_UNIT_DAY"})
        assert int(usage["total"]["jobsCreated"]) >= 1
        points = (await api.ok("GET", f"/v1/jobs/{job_id}/metrics",
                               params={"kinds": "METRIC_KIND_TRAIN", "pageSize": "1000"}))["points"]
        assert points and all("loss" in p for p in points)
        streamed = await api.events(f"/v1/jobs/{job_id}/metrics:stream", params={"follow": "false"})
        stream_points = [p for _, d in streamed
                         for p in ([d["point"]] if "point" in d else d.get("points", []))]
        assert len(stream_points) >= len(points)
        logs = await api.events(f"/v1/jobs/{job_id}/logs:stream")
        assert any("entry" in d or d.get("entries") for _, d in logs)

        # -- cancel and delete a job (snake_case JSON in) --
        second = await api.ok("POST", "/v1/jobs", {"name": "http-cancel", "request_id": str(uuid.uuid4()),
                                                   "spec": queued_spec(model, dataset["id"])})
        cancelled = await api.ok("POST", f"/v1/jobs/{second['job']['id']}:cancel", {})
        assert cancelled["job"]["state"] == "JOB_STATE_CANCELLED"
        deleted = await api.ok("DELETE", "/v1/jobs/http-cancel")
        assert deleted["job"] == second["job"]["id"]

        # -- deployments of the finished job --
        deployment = (await api.ok("POST", "/v1/deployments",
                                   {"job": job_id, "name": "http-dep"}))["deployment"]
        assert deployment["state"] in ("DEPLOYMENT_STATE_PENDING", "DEPLOYMENT_STATE_READY")
        assert (await api.ok("GET", "/v1/deployments/http-dep"))["deployment"]["id"] == deployment["id"]
        listed_deployments = await api.ok("GET", "/v1/deployments", params={"job": job_id})
        assert [d["id"] for d in listed_deployments["deployments"]] == [deployment["id"]]
        assert (await api.ok("DELETE", "/v1/deployments/http-dep"))["deployment"] == deployment["id"]

    every = {route.method.name for route in all_routes()}
    assert reached == every, f"routes never called over HTTP: {sorted(every - reached)}"


async def test_errors_are_status_json_with_the_mapped_http_status(
        platform: Platform, keys: dict[str, str], tiny_assets: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny_assets
    async with Api(platform.http_url, None) as anonymous:
        status, answer = await anonymous.call("GET", "/v1/jobs")
        assert status == 401 and answer["code"] == 16 and error_reason(answer) == "UNAUTHENTICATED"
    async with Api(platform.http_url, "tf_not_a_real_key") as wrong:
        assert (await wrong.call("GET", "/v1/caller"))[0] == 401
    async with Api(platform.http_url, keys["viewer"]) as viewer:
        status, answer = await viewer.call("POST", "/v1/jobs", {"name": "x", "spec": {}})
        assert status == 403 and answer["code"] == 7
    async with Api(platform.http_url, keys["a"]) as api:
        status, answer = await api.call("GET", "/v1/jobs/no-such-job")
        assert status == 404 and answer["code"] == 5 and error_reason(answer) == "NOT_FOUND"
        status, answer = await api.call("GET", "/v1/no/such/route")
        assert status == 404 and answer["code"] == 5
        status, answer = await api.call("PUT", "/v1/jobs")
        assert status == 405 and answer["code"] == 12
        # The services' own validation: a BadRequest naming the field.
        status, answer = await api.call("POST", "/v1/jobs", {"name": "bad", "spec": {
            "baseModel": str(model), "dataset": "no-such-dataset", "hyperparameters": {"learningRate": -1}}})
        assert status in (400, 404) and answer["details"], answer
        status, answer = await api.call("POST", "/v1/jobs", {"name": "bad", "spec": {"baseModel": ""}})
        assert status == 400 and any(f.startswith("spec") for f in violations(answer)), answer
        # The gateway's: JSON that does not parse, unknown fields, wrong types, bad query values.
        status, answer = await api.call("POST", "/v1/jobs", data=b'{"name": "x",',
                                        headers={"Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in violations(answer)["body"]
        status, answer = await api.call("POST", "/v1/jobs", {"name": "x", "spec": {"learning_rate": 0.1}})
        assert status == 400 and "unknown field" in violations(answer)["spec.learning_rate"]
        status, answer = await api.call("POST", "/v1/jobs", {"name": 5})
        assert status == 400 and set(violations(answer)) == {"name"}
        status, answer = await api.call("GET", "/v1/jobs", params={"pageSize": "ten", "states": "RUNNING"})
        assert status == 400 and set(violations(answer)) == {"pageSize", "states"}
        assert "JOB_STATE_RUNNING" in violations(answer)["states"]
        status, answer = await api.call("GET", "/v1/jobs/x", data=b'{"a": 1}')
        assert status == 400 and "body" in violations(answer)
        status, answer = await api.call("POST", "/v1/jobs", data=b'{"name": "' + b"x" * (9 << 20) + b'"}')
        assert status == 413 and answer["code"] == 8
        # An upload that fails validation: 400, the service's reason and the bad lines.
        bad_file = tmp_path / "bad.jsonl"
        bad_file.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n' * 3)
        status, answer = await upload(api, bad_file, "bad-data", minExamples="1")
        assert status == 400 and error_reason(answer) == "DATASET_INVALID", answer
        status, answer = await upload(api, data, "x", colour="red")
        assert status == 400 and set(violations(answer)) == {"colour"}
        status, answer = await api.call("GET", "/v1/jobs", params={"startTime": "x"})
        assert status == 400 and "startTime" in violations(answer)


async def test_over_its_calls_per_second_an_organization_gets_429_with_retry_after(
        platform: Platform) -> None:
    """The services' RetryInfo becomes the Retry-After header (whole seconds, at least 1) beside the JSON
    status; a caller that waits that long is let in again."""
    key = make_key(platform.address, platform.data_dir, "gw-rate")  # its own allowance: no other test's
    async with aiohttp.ClientSession(platform.http_url, headers={"Authorization": f"Bearer {key}"}) as http:

        async def caller() -> tuple[int, str | None, Any]:
            async with http.get("/v1/caller") as response:
                return response.status, response.headers.get("Retry-After"), await response.json()

        answers = await asyncio.gather(*(caller() for _ in range(250)))
        refused = [(after, body) for status, after, body in answers if status == 429]
        assert refused and {status for status, _, _ in answers} == {200, 429}
        for after, body in refused:
            assert after is not None and int(after) >= 1, after
            assert error_reason(body) == "QUOTA_EXCEEDED"
            assert "TUNEFORGE_API_CALLS_PER_SECOND" in body["message"]
            assert any(d["@type"].endswith("google.rpc.RetryInfo") for d in body["details"]), body
        await asyncio.sleep(max(int(after) for after, _ in refused))
        assert (await caller())[0] == 200


async def test_organizations_do_not_see_each_others_jobs_over_http(
        platform: Platform, keys: dict[str, str], tiny_assets: tuple[Path, Path]) -> None:
    model, data = tiny_assets
    async with Api(platform.http_url, keys["a"]) as a, Api(platform.http_url, keys["b"]) as b:
        status, uploaded = await upload(a, data, f"tenancy-{uuid.uuid4().hex[:6]}")
        assert status == 200, uploaded
        job = (await a.ok("POST", "/v1/jobs", {"spec": queued_spec(model, uploaded["dataset"]["id"])}))["job"]
        for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}:cancel"),
                             ("GET", f"/v1/jobs/{job['id']}/events"), ("GET", f"/v1/jobs/{job['id']}:watch"),
                             ("GET", f"/v1/datasets/{uploaded['dataset']['id']}")):
            status, answer = await b.call(method, path, {} if method == "POST" else None)
            assert status == 404 and answer["code"] == 5, (method, path, answer)
        assert job["id"] not in {j["id"] for j in (await b.ok("GET", "/v1/jobs")).get("jobs", [])}
        status, answer = await b.call("GET", "/v1/jobs", params={"organization": "gw-a"})
        assert status == 403, answer
        assert (await a.ok("POST", f"/v1/jobs/{job['id']}:cancel"))["job"]["state"] == "JOB_STATE_CANCELLED"


async def test_a_stream_whose_client_leaves_is_cancelled(
        platform: Platform, keys: dict[str, str], tiny_assets: tuple[Path, Path]) -> None:
    """The gateway in this process (same code as the platform's), so its open streams can be counted."""
    model, data = tiny_assets
    app = create_app(platform.address, console=False)
    async with TestServer(app) as server:
        base = str(server.make_url(""))
        async with Api(base, keys["a"]) as api:
            status, uploaded = await upload(api, data, f"stream-{uuid.uuid4().hex[:6]}")
            assert status == 200, uploaded
            spec = queued_spec(model, uploaded["dataset"]["id"])
            job = (await api.ok("POST", "/v1/jobs", {"spec": spec}))["job"]
            headers = {"Authorization": f"Bearer {keys['a']}"}
            async with aiohttp.ClientSession() as session:
                response = await session.get(f"{base}/v1/jobs/{job['id']}:watch", headers=headers)
                assert response.status == 200 and response.content_type == "text/event-stream"
                first = await response.content.readline()
                assert json.loads(first.decode().removeprefix("data: "))["job"]["state"] == "JOB_STATE_QUEUED"
                assert app[ACTIVE_STREAMS]["WatchJob"] == 1
                response.close()  # the client goes away while the job still waits
            deadline = time.monotonic() + 10
            while app[ACTIVE_STREAMS]["WatchJob"] and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert app[ACTIVE_STREAMS]["WatchJob"] == 0
            # A stream that starts with an error is a plain HTTP error, not an event stream.
            status, answer = await api.call("GET", "/v1/jobs/no-such-job:watch")
            assert status == 404 and answer["code"] == 5
            await api.ok("POST", f"/v1/jobs/{job['id']}:cancel")


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_the_gateway_holds_no_secret_of_the_services(platform: Platform) -> None:
    """It carries each caller's key; the services' NATS password, the bootstrap key file and the like stay
    with the services process."""
    assert platform.gateway is not None and platform.services is not None
    services, gateway = environment(platform.services.pid), environment(platform.gateway.pid)
    for name in ("TUNEFORGE_NATS_PASSWORD", "TUNEFORGE_BOOTSTRAP_ADMIN_KEY_FILE"):
        assert name in services and name not in gateway


def test_the_supervisor_restarts_a_dead_gateway_on_the_same_url(platform: Platform) -> None:
    import urllib.request

    url = platform.http_url
    assert platform.gateway is not None
    os.kill(platform.gateway.pid, signal.SIGKILL)
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while not any("HTTP gateway restarted" in line for line in lines):
        assert time.monotonic() < deadline, lines
        lines += platform.supervise()
        time.sleep(0.1)
    assert platform.http_url == url
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
        assert json.load(response) == {"status": "SERVING"}



async def test_a_stream_that_fails_midway_ends_with_an_error_event(
        platform: Platform, keys: dict[str, str], tiny_assets: tuple[Path, Path]) -> None:
    """The services process dies while a watch is open: the stream ends with `event: error` carrying the
    Status (UNAVAILABLE), not with a silent close. The supervisor then brings the services back."""
    model, data = tiny_assets
    async with Api(platform.http_url, keys["a"]) as api:
        status, uploaded = await upload(api, data, f"midway-{uuid.uuid4().hex[:6]}")
        assert status == 200, uploaded
        spec = queued_spec(model, uploaded["dataset"]["id"])
        job = (await api.ok("POST", "/v1/jobs", {"spec": spec}))["job"]
        assert api.session is not None
        async with api.session.get(f"/v1/jobs/{job['id']}:watch") as response:
            assert response.status == 200
            first = await response.content.readline()
            assert json.loads(first.decode().removeprefix("data: "))["job"]["id"] == job["id"]
            assert platform.services is not None
            os.kill(platform.services.pid, signal.SIGKILL)
            rest = (await asyncio.wait_for(response.content.read(), 30)).decode()
    assert "event: error\ndata: " in rest, rest
    error = json.loads(rest.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["code"] == 14, error
    deadline = time.monotonic() + 60
    lines: list[str] = []
    while not any(line.startswith("services restarted") for line in lines):
        assert time.monotonic() < deadline, lines
        lines += platform.supervise()
        await asyncio.sleep(0.2)


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_with_the_platforms_tls_settings_the_gateway_serves_https(tmp_path: Path) -> None:
    """The services' certificate serves HTTPS too, and the gateway reaches the TLS services through TLS."""
    import ssl
    import urllib.error
    import urllib.request

    from services.platform.supervisor import PlatformConfig

    cert, key = _certificate(tmp_path)
    env = {"TUNEFORGE_TLS_CERT_FILE": str(cert), "TUNEFORGE_TLS_KEY_FILE": str(key),
           "TUNEFORGE_TLS_CA_FILE": str(cert)}
    platform = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=0, env=env))
    platform.start()  # from the main thread: its children die with this one
    try:
        assert platform.http_url.startswith("https://127.0.0.1:")
        admin = (platform.data_dir / "admin.key").read_text().strip()
        request = urllib.request.Request(f"{platform.http_url}/v1/caller",
                                         headers={"Authorization": f"Bearer {admin}"})
        trusting = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(request, context=trusting, timeout=10) as response:
            assert json.load(response)["caller"]["organization"] == "default"
        plain = urllib.request.Request(platform.http_url.replace("https://", "http://") + "/v1/caller")
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the HTTPS port
            urllib.request.urlopen(plain, timeout=10).read()
    finally:
        platform.stop()
