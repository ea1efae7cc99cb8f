"""docker-compose.yml run without Docker: its services' own commands, environment, secrets and health checks
as local processes, against real PostgreSQL (a fresh schema of the local server), a real nats-server
started from the compose command with the shipped deploy/nats/nats.conf, and a real S3 server (seaweedfs),
and one tiny training job through them.

Rewritten, and nothing else: compose hostnames and ports to 127.0.0.1 and free ports, container paths
(/run/secrets/*, /etc/nats, /var/lib/tuneforge, /models) to folders of the test, `python` to this
interpreter, and the database URL secret to the test's PostgreSQL schema. The secrets are the ones
deploy/docker/make_secrets.py writes, so the NATS users, the S3 key and the shared service token are
what a compose deployment gets. PostgreSQL's and seaweedfs's own containers are replaced by the local
server and tests/seaweed.py; the Envoy gateway has no local binary, so the test calls each service at
its own address and checks that every route of deploy/docker/envoy.yaml reaches a process that serves it.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tuneforge.v1 import dataset_pb2, job_pb2, metrics_pb2

from services.client import TuneForgeClient
from services.kit.embedded import nats_server_binary
from tests.e2e.conftest import lora_spec, tiny_assets, wait_final
from tests.seaweed import free_port, seaweedfs

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.s3]
__all__ = ["tiny_assets"]  # the e2e fixture, used here

ROOT = Path(__file__).resolve().parents[2]
# The services of the default profile that run our code, in start order (migrations first, to completion).
SERVICES = ("identity", "datasets", "jobs", "estimation", "metrics")
WORKER = "worker-cpu"
# The variables a process needs from this machine besides the compose environment (no model hub here).
HOST_ENV = ("PATH", "HOME", "LANG", "TZ", "TMPDIR")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Rewrites:
    """Container names and paths of docker-compose.yml -> this machine's."""

    hosts: dict[str, str] = field(default_factory=dict)  # "jobs:50051" -> "127.0.0.1:41234"
    paths: dict[str, Path] = field(default_factory=dict)  # "/models" -> tmp folder

    def value(self, text: str) -> str:
        for name, local in self.hosts.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w])", local, text)
        for container, folder in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            if text == container or text.startswith(container + "/"):
                return str(folder) + text[len(container):]
        return text


@dataclass
class Stack:
    compose: dict[str, Any]
    root: Path
    secrets: Path
    rewrites: Rewrites
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def service(self, name: str) -> dict[str, Any]:
        service: dict[str, Any] = self.compose["services"][name]
        return service

    def env(self, name: str) -> dict[str, str]:
        service = self.service(name)
        rewrites = Rewrites(dict(self.rewrites.hosts), dict(self.rewrites.paths))
        rewrites.paths["/var/lib/tuneforge"] = self.root / name / "data"
        for item in service.get("secrets") or []:
            source, target = (item, item) if isinstance(item, str) else (item["source"], item.get("target"))
            target = target or source
            path = target if target.startswith("/") else f"/run/secrets/{target}"
            rewrites.paths[path] = self.secrets / Path(self.compose["secrets"][source]["file"]).name
        env = {k: os.environ[k] for k in HOST_ENV if k in os.environ} | OFFLINE
        for key, value in (service.get("environment") or {}).items():
            env[key] = rewrites.value("" if value is None else str(value))
        for key in ("TUNEFORGE_METRICS_PORT", "TUNEFORGE_WORKER_METRICS_PORT"):  # one port each per container
            if env.get(key, "0") != "0":
                env[key] = str(self.metrics_ports.setdefault(name, free_port()))
                env["TUNEFORGE_METRICS_HOST"] = "127.0.0.1"
        if "TUNEFORGE_GRPC_PORT" in env and name in self.ports:
            env["TUNEFORGE_GRPC_HOST"] = "127.0.0.1"  # 0.0.0.0 in a container; loopback here
            env["TUNEFORGE_GRPC_PORT"] = str(self.ports[name])
        return env

    def argv(self, name: str, command: list[str]) -> list[str]:
        out = [sys.executable if arg == "python" else arg for arg in command]
        return [self.rewrites.value(arg) for arg in out]

    def start(self, name: str) -> None:
        (self.root / name / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.root / name / "process.log", "ab")
        self.procs[name] = subprocess.Popen(
            self.argv(name, self.service(name)["command"]), env=self.env(name), cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def healthy(self, name: str) -> bool:
        """The service's own compose health check, run here ("CMD" dropped)."""
        test = self.service(name)["healthcheck"]["test"]
        assert test[0] == "CMD"
        result = subprocess.run(self.argv(name, test[1:]), env=self.env(name), cwd=ROOT,
                                capture_output=True, timeout=30)
        return result.returncode == 0

    def wait_healthy(self, names: list[str], timeout_s: float = 120) -> None:
        pending = list(names)
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log(name)}"
                if self.healthy(name):
                    pending.remove(name)
            assert time.monotonic() < deadline, f"not healthy in time: {pending}\n" + \
                "\n".join(self.log(n) for n in pending)
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / name / "process.log"
        return f"--- {name} ---\n" + (path.read_text(errors="replace")[-4000:] if path.exists() else "")

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def nats_from_compose(compose: dict[str, Any], root: Path, secrets: Path) -> Iterator[tuple[int, int]]:
    """nats-server as the compose "nats" service starts it: its command, nats.conf (listen, monitoring
    and store paths rewritten) and the nats_auth secret beside it. Yields (client port, monitoring port)."""
    service = compose["services"]["nats"]
    etc, data = root / "etc-nats", root / "nats-data"
    etc.mkdir()
    data.mkdir()
    port, http_port = free_port(), free_port()
    for config in service["configs"]:
        text = (ROOT / compose["configs"][config["source"]]["file"]).read_text()
        text = text.replace("0.0.0.0:4222", f"127.0.0.1:{port}")
        text = text.replace("0.0.0.0:8222", f"127.0.0.1:{http_port}")
        text = re.sub(r'store_dir:\s*"/data"', f'store_dir: "{data}"', text)
        (etc / Path(config["target"]).name).write_text(text)
    for secret in service["secrets"]:
        assert secret["target"].startswith("/etc/nats/")
        source = secrets / Path(compose["secrets"][secret["source"]]["file"]).name
        (etc / Path(secret["target"]).name).write_text(source.read_text())
    command = [nats_server_binary() if arg == "nats-server" else arg.replace("/etc/nats", str(etc))
               for arg in service["command"]]
    log = open(root / "nats.log", "ab")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={k: os.environ[k] for k in HOST_ENV if k in os.environ})
    log.close()
    # The compose health check's URL, on the rewritten monitoring port.
    health = next(a for a in service["healthcheck"]["test"] if a.startswith("http://"))
    health = health.replace(":8222/", f":{http_port}/")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (root / "nats.log").read_text()
            try:
                with urllib.request.urlopen(health, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "nats-server not healthy in time"
            time.sleep(0.1)
        yield port, http_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_credentials(secrets: Path) -> tuple[str, str]:
    parser = configparser.ConfigParser()
    parser.read(secrets / "s3_credentials")
    return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]


def test_compose_services_run_a_job_as_local_processes(
        tmp_path: Path, postgres_url: str, tiny_assets: tuple[Path, Path]) -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    model, data = tiny_assets
    secrets = tmp_path / "secrets"
    load_module(ROOT / "deploy" / "docker" / "make_secrets.py").make_secrets(secrets)
    # The one secret that names this machine: the fresh PostgreSQL schema instead of postgres:5432.
    (secrets / "database_url").write_text(postgres_url + "\n")
    key_id, secret_key = s3_credentials(secrets)
    identities = json.loads((secrets / "seaweedfs_s3.json").read_text())["identities"]

    def s3_answers(endpoint: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                     aws_secret_access_key=secret_key).list_buckets()

    with contextlib.ExitStack() as stack:
        nats_port, _ = stack.enter_context(nats_from_compose(compose, tmp_path, secrets))
        (tmp_path / "seaweed").mkdir()
        s3_endpoint = stack.enter_context(seaweedfs(tmp_path / "seaweed", identities, s3_answers))
        ports = {name: free_port() for name in (*SERVICES, "serving")}
        rewrites = Rewrites(
            hosts={"nats:4222": f"127.0.0.1:{nats_port}",
                   "seaweedfs:8333": s3_endpoint.removeprefix("http://"),
                   **{f"{name}:50051": f"127.0.0.1:{port}" for name, port in ports.items()}},
            paths={"/models": model.parent.resolve()})
        run = Stack(compose, tmp_path / "run", secrets, rewrites, ports)
        stack.callback(run.stop)

        # The migrations step, to completion, before any service (as depends_on says).
        migrations = run.service("migrations")
        result = subprocess.run(run.argv("migrations", migrations["command"]), env=run.env("migrations"),
                                cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "every service at head" in result.stdout
        from sqlalchemy import create_engine, inspect

        engine = create_engine(postgres_url)
        try:
            tables = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert {f"alembic_version_{s}" for s in (*SERVICES, "serving")} <= tables, tables
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret_key)
        assert "tuneforge" in {b["Name"] for b in s3.list_buckets()["Buckets"]}  # made by the step

        for name in SERVICES:
            run.start(name)
        run.wait_healthy(list(SERVICES))
        run.start(WORKER)
        run.wait_healthy([WORKER], timeout_s=60)

        # Every route of the gateway reaches a process that serves that API (health knows each name).
        envoy = yaml.safe_load((ROOT / "deploy" / "docker" / "envoy.yaml").read_text())
        manager = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            api, target = route["match"]["prefix"].strip("/"), route["route"]["cluster"]
            if target not in SERVICES:
                assert compose["services"][target].get("profiles"), target  # serving: its own profile
                continue
            with grpc.insecure_channel(f"127.0.0.1:{ports[target]}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=api), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, (api, target)

        # The first admin key, where the identity service's compose environment says.
        admin_key = run.root / "identity" / "data" / "admin.key"
        deadline = time.monotonic() + 30
        while not admin_key.exists():
            assert time.monotonic() < deadline, run.log("identity")
            time.sleep(0.2)
        api_key = admin_key.read_text().strip()

        def client(name: str) -> TuneForgeClient:
            return stack.enter_context(TuneForgeClient(f"127.0.0.1:{ports[name]}", api_key=api_key))

        dataset = client("datasets").upload_dataset(data, "compose-chat").dataset
        assert dataset.state == dataset_pb2.DATASET_STATE_READY
        jobs = client("jobs")
        job = jobs.create_job(lora_spec(model, dataset.id, epochs=1), name="compose-job")
        try:
            final = wait_final(jobs, job.id, timeout_s=240)
        except AssertionError:
            raise AssertionError("\n".join(run.log(n) for n in (*SERVICES, WORKER))) from None
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, \
            f"{final.error}\n" + "\n".join(run.log(n) for n in ("jobs", WORKER))
        # Outputs in the S3 store, metrics through the metrics service (which asks the jobs service).
        assert final.output.adapter_uri.startswith("s3://tuneforge/objects/"), final.output.adapter_uri
        points = [p for p in client("metrics").stream_metrics(job.id, follow=False)
                  if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
        assert points and all(p.loss > 0 for p in points)
        listed = s3.list_objects_v2(Bucket="tuneforge", Prefix="objects/")
        assert any(o["Key"].endswith("adapter_model.safetensors") for o in listed.get("Contents", []))
        # The jobs service heard the worker's heartbeats, under the compose worker's GPU type.
        workers = jobs.list_workers().workers
        assert [w.gpu_type for w in workers if w.alive] == ["cpu"], workers
