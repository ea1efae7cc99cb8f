"""Every TUNEFORGE_* variable the deployments set (deploy/k8s overlays; docker-compose.yml once it exists)
is a setting some process really reads, the settings that must agree between processes agree, and every
address points at a Service (or compose service) of the same deployment: no typo that a process would
silently ignore, no service pointed at a name that does not exist.

"Really reads": the pydantic-settings classes of services/, trainer_worker/ and tuneforge_core/ (their
env_prefix + field name, found by importing every module that declares one), the TUNEFORGE_<NAME>_FILE
variants of the secret settings, and TUNEFORGE_* names the code reads from os.environ directly.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic_settings import BaseSettings

from tests.deploy.test_k8s_manifests import K8S, OVERLAYS, Doc, build, of_kind, pod_spec, workloads

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "trainer_worker", "tuneforge_core")
COMPOSE = ROOT / "docker-compose.yml"
# Settings whose value is a network address of another part of the same deployment.
URL_SETTINGS = ("TUNEFORGE_NATS_URL", "TUNEFORGE_S3_ENDPOINT_URL", "TUNEFORGE_DATABASE_URL")
# host:port addresses not named *_ADDRESS (the HTTP gateway's gRPC target).
HOST_PORT_SETTINGS = ("TUNEFORGE_GATEWAY_GRPC_TARGET",)
# Processes that are neither services nor workers: the HTTP gateway and its gRPC router (base/http.yaml).
# They hold no secret and reach no NATS, database or store (the HTTP gateway forwards callers' keys).
GATEWAY_PROCESSES = ("http/", "gateway/")
# Settings every process of one deployment must see alike (one work queue, one NATS, one store, one
# database, tokens every replica must verify).
SHARED_SETTINGS = ("TUNEFORGE_NATS_URL", "TUNEFORGE_NATS_STREAM_REPLICAS", "TUNEFORGE_STORAGE_URL",
                   "TUNEFORGE_S3_ENDPOINT_URL", "TUNEFORGE_S3_REGION", "TUNEFORGE_WORK_ACK_WAIT_S",
                   "TUNEFORGE_WORK_MAX_DELIVER", "TUNEFORGE_DATABASE_URL", "TUNEFORGE_SERVICE_TOKEN",
                   "TUNEFORGE_PAGE_TOKEN_KEY", "TUNEFORGE_DATASETS_ADDRESS", "TUNEFORGE_JOBS_ADDRESS",
                   "TUNEFORGE_ESTIMATION_ADDRESS", "TUNEFORGE_RAY_ADDRESS")


def sources() -> list[Path]:
    return [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
            if "migrations" not in p.parts and "identity_migrations" not in p.parts]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def settings_classes() -> list[type[BaseSettings]]:
    """Every BaseSettings subclass our code declares (importing each module that declares one)."""
    for path in sources():
        if re.search(r"^class \w+\(\w*Settings\):", path.read_text(), re.M):
            importlib.import_module(module_name(path))
    found: list[type[BaseSettings]] = []
    todo: list[type[BaseSettings]] = [BaseSettings]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in PACKAGES:
                found.append(sub)
    return found


@functools.cache
def read_settings() -> frozenset[str]:
    names: set[str] = set()
    for cls in settings_classes():
        prefix = str(cls.model_config.get("env_prefix", ""))
        if prefix.startswith("TUNEFORGE_"):
            names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    secret_files = getattr(importlib.import_module("tuneforge_core.settings"), "SECRET_FILE_SETTINGS", ())
    names |= {f"TUNEFORGE_{name.upper()}_FILE" for name in secret_files}
    for path in sources():
        text = path.read_text()
        names |= set(re.findall(r"(?:environ(?:\.get)?\(|environ\[|getenv\()\s*\"(TUNEFORGE_\w+)\"", text))
        names |= set(re.findall(r"^[A-Z_]*ENV\s*=\s*\"(TUNEFORGE_\w+)\"", text, re.M))
    return frozenset(names)


def test_the_collected_settings_include_what_each_kind_of_process_reads() -> None:
    names = read_settings()
    # Kit (every process), a service's own, the worker's, another prefix, the nats stream setting, a
    # direct os.environ read: if one of these is missing the collection is broken, not the manifests.
    for name in ("TUNEFORGE_NATS_URL", "TUNEFORGE_MAX_UPLOAD_BYTES", "TUNEFORGE_WORKER_GPU_TYPE",
                 "TUNEFORGE_METRICS_INGEST_BATCH", "TUNEFORGE_NATS_STREAM_REPLICAS", "TUNEFORGE_READY_FILE",
                 "TUNEFORGE_ESTIMATION_CATALOG_DIR"):
        assert name in names, name
    assert "TUNEFORGE_NO_SUCH_SETTING" not in names


# -- Kubernetes -------------------------------------------------------------------------------------------

def container_env(docs: tuple[Doc, ...], container: Doc) -> dict[str, Any]:
    """A container's TUNEFORGE_*-and-other variables: ConfigMaps it loads whole, then its own env (wins)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def k8s_processes(name: str) -> dict[str, dict[str, Any]]:
    docs = build(f"overlays/{name}")
    return {f"{doc['metadata']['name']}/{c['name']}": container_env(docs, c)
            for doc in workloads(docs) for c in pod_spec(doc)["containers"]}


def example_secret(ref: dict[str, Any]) -> str:
    secrets = {d["metadata"]["name"]: d["stringData"]
               for d in yaml.safe_load_all((K8S / "examples" / "secrets.yaml").read_text()) if d}
    value: str = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
    return value


def kuberay_head_services(docs: tuple[Doc, ...]) -> dict[str, set[int]]:
    """The Service the KubeRay operator makes for each RayCluster's head: `<name>-head-svc`, serving the
    head container's ports. Not in the manifests, but an address a process may name
    (TUNEFORGE_RAY_ADDRESS)."""
    services = {}
    for cluster in of_kind(docs, "RayCluster"):
        (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        services[f"{cluster['metadata']['name']}-head-svc"] = {p["containerPort"] for p in head["ports"]}
    return services


def is_address(var: str) -> bool:
    named_address = var.startswith("TUNEFORGE_") and var.endswith("_ADDRESS")
    return named_address or var in URL_SETTINGS + HOST_PORT_SETTINGS


def host_port(name: str, value: str) -> tuple[str, int | None]:
    if name.endswith("_ADDRESS") or name in HOST_PORT_SETTINGS:
        host, _, port = value.removeprefix("dns:///").rpartition(":")
        return host, int(port)
    url = urlsplit(value)
    assert url.hostname, f"{name}={value}: no host"
    return url.hostname, url.port


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_tuneforge_variable_in_the_k8s_manifests_is_read_by_a_process(name: str) -> None:
    unknown = {f"{process}: {var}" for process, env in k8s_processes(name).items()
               for var in env if var.startswith("TUNEFORGE_") and var not in read_settings()}
    assert unknown == set()


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_addresses_point_at_services_of_the_same_deployment(name: str) -> None:
    docs = build(f"overlays/{name}")
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
                for d in of_kind(docs, "Service")}
    services |= kuberay_head_services(docs)
    checked = set()
    for process, env in k8s_processes(name).items():
        for var, value in env.items():
            if not is_address(var):
                continue
            if isinstance(value, dict):  # from a Secret: the example shows its shape
                value = example_secret(value)
            if not value:
                continue
            host, port = host_port(var, value)
            assert host in services, f"{process}: {var}={value} names no Service of this deployment"
            assert port is None or port in services[host], f"{process}: {var}={value}: port not served"
            checked.add(var)
    assert {"TUNEFORGE_NATS_URL", "TUNEFORGE_DATABASE_URL", "TUNEFORGE_S3_ENDPOINT_URL",
            "TUNEFORGE_JOBS_ADDRESS", "TUNEFORGE_DATASETS_ADDRESS", "TUNEFORGE_ESTIMATION_ADDRESS",
            "TUNEFORGE_GATEWAY_GRPC_TARGET"} <= checked


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_processes_agree_on_shared_settings_and_have_what_they_need(name: str) -> None:
    processes = k8s_processes(name)
    for var in SHARED_SETTINGS:
        values = {repr(env[var]) for env in processes.values() if var in env}
        assert len(values) <= 1, f"{var} differs between processes: {values}"
    for process, env in processes.items():
        if process.startswith("tuneforge-migrations/"):
            assert "TUNEFORGE_DATABASE_URL" in env
            continue
        if process.startswith(GATEWAY_PROCESSES):
            held = {"TUNEFORGE_NATS_URL", "TUNEFORGE_NATS_PASSWORD", "TUNEFORGE_DATABASE_URL",
                    "TUNEFORGE_SERVICE_TOKEN", "TUNEFORGE_PAGE_TOKEN_KEY", "TUNEFORGE_STORAGE_URL"} & set(env)
            assert held == set(), f"{process} holds {held}"
            continue
        for var in ("TUNEFORGE_NATS_URL", "TUNEFORGE_NATS_USER", "TUNEFORGE_NATS_PASSWORD",
                    "TUNEFORGE_STORAGE_URL", "TUNEFORGE_WORK_ACK_WAIT_S", "TUNEFORGE_WORK_MAX_DELIVER"):
            if process.startswith("nats/"):
                break
            assert var in env, f"{process} lacks {var}"
        if process.startswith("worker-"):
            assert env["TUNEFORGE_NATS_USER"] == "worker"
            assert "TUNEFORGE_DATABASE_URL" not in env, "workers never see the database"
        elif not process.startswith("nats/"):
            assert env["TUNEFORGE_NATS_USER"] == "services"
            assert "TUNEFORGE_DATABASE_URL" in env and env["TUNEFORGE_GRPC_HOST"] == "0.0.0.0"
            # Several pods: a shared object store, never a pod's own folder.
            assert env["TUNEFORGE_STORAGE_URL"].startswith("s3://")


# -- docker-compose.yml -----------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    if not COMPOSE.exists():
        pytest.skip("docker-compose.yml does not exist yet (its half of the consistency check waits for it)")
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def test_every_tuneforge_variable_in_compose_is_read_by_a_process() -> None:
    unknown = {f"{name}: {var}" for name, service in compose()["services"].items()
               for var in compose_environment(service)
               if var.startswith("TUNEFORGE_") and var not in read_settings()}
    assert unknown == set()


def test_compose_addresses_point_at_compose_services() -> None:
    services = compose()["services"]
    names = set(services)
    for service in services.values():
        names.add(service.get("hostname", ""))
        networks = service.get("networks")
        for network in networks.values() if isinstance(networks, dict) else []:
            names |= set((network or {}).get("aliases", []))
    checked = set()
    for name, service in services.items():
        for var, value in compose_environment(service).items():
            if not is_address(var):
                continue
            if not value or "${" in value:
                continue
            host, _ = host_port(var, value)
            assert host in names, f"{name}: {var}={value} names no compose service"
            checked.add(var)
    assert "TUNEFORGE_NATS_URL" in checked


def test_compose_services_agree_on_shared_settings() -> None:
    environments = [compose_environment(s) for s in compose()["services"].values()]
    for var in SHARED_SETTINGS:
        values = {env[var] for env in environments if var in env}
        assert len(values) <= 1, f"{var} differs between compose services: {values}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_compose_and_k8s_name_the_services_alike(name: str) -> None:
    """The same service names and ports in both (a client or script written for one works on the other).
    Kubernetes' services reach each other through each Service's headless twin, "dns:///<name>-pods:port"
    (every replica; base/services.yaml), which names the same service."""
    k8s = {var: env[var] for env in k8s_processes(name).values() for var in env
           if var.endswith("_ADDRESS") or var in HOST_PORT_SETTINGS}
    in_compose = {var: value for s in compose()["services"].values()
                  for var, value in compose_environment(s).items()
                  if var.endswith("_ADDRESS") or var in HOST_PORT_SETTINGS}
    assert k8s and in_compose
    assert "TUNEFORGE_GATEWAY_GRPC_TARGET" in k8s.keys() & in_compose.keys()
    for var in k8s.keys() & in_compose.keys():
        assert same_service(k8s[var]) == in_compose[var], var


def same_service(address: Any) -> Any:
    """A "dns:///<name>-pods:port" address as "<name>:port"; any other as it is."""
    if not isinstance(address, str) or not address.startswith("dns:///"):
        return address
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    return f"{host.removesuffix('-pods')}:{port}"
