"""docker-compose.yml, deploy/nats/nats.conf, deploy/docker/ and the Envoy gateway, checked without a Docker
engine: the compose-spec JSON schema, the durability and secret rules, and the wiring between the files.

What the file *runs* is proven by tests/deploy/test_compose_commands.py (its commands as local processes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
DOCKER = ROOT / "deploy" / "docker"
ENVOY = DOCKER / "envoy.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
# Variable names that carry a secret: their values must come from files.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)|CREDENTIALS|DATABASE_URL", re.IGNORECASE)


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_schema() -> dict[str, Any]:
    import check_jsonschema  # type: ignore[import-untyped]

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def one_shot(compose: dict[str, Any]) -> set[str]:
    """Services others wait for to *finish* (service_completed_successfully): the migrations step."""
    return {name for service in compose["services"].values()
            for name, dep in (service.get("depends_on") or {}).items()
            if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    """The service's mounted secrets: path in the container -> secret name."""
    out = {}
    for item in service.get("secrets") or []:
        if isinstance(item, str):
            source, target = item, item
        else:
            source, target = item["source"], item.get("target", item["source"])
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return out


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(load_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_wrong_file() -> None:
    """The validation above is not vacuous: a misspelt key and a wrong type are reported."""
    compose = load_compose()
    compose["services"]["jobs"]["helthcheck"] = {"test": ["CMD", "true"]}
    compose["services"]["nats"]["ports"] = 4222
    schema = compose_schema()
    messages = [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(compose)]
    assert any("helthcheck" in m for m in messages), messages
    assert any("4222" in m for m in messages), messages


def test_nats_syncs_every_write_and_keeps_its_store_on_a_volume() -> None:
    text = NATS_CONF.read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    jetstream = re.search(r"jetstream\s*\{([^}]*)\}", body)
    assert jetstream, "nats.conf has no jetstream block"
    assert re.search(r"^\s*sync_interval\s*[:=]\s*always\s*$", jetstream.group(1), re.MULTILINE)
    store_dir = re.search(r"store_dir\s*[:=]\s*\"?([^\"\s]+)\"?", jetstream.group(1))
    assert store_dir, "jetstream has no store_dir"
    compose = load_compose()
    nats = compose["services"]["nats"]
    assert "/etc/nats/nats.conf" in nats["command"]
    assert any(c["target"] == "/etc/nats/nats.conf" and compose["configs"][c["source"]]["file"] ==
               "./deploy/nats/nats.conf" for c in nats["configs"])
    named = set(compose["volumes"])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nats["volumes"]}
    on_volume = [path for path, volume in mounts.items()
                 if volume in named and (store_dir.group(1) + "/").startswith(path.rstrip("/") + "/")]
    assert on_volume, f"store_dir {store_dir.group(1)} is on no named volume ({mounts})"
    # nats.conf's include is the mounted users file, beside the config.
    include = re.search(r"^\s*include\s+\"?\./([^\"\s]+)\"?", body, re.MULTILINE)
    assert include and f"/etc/nats/{include.group(1)}" in secret_targets(nats)


def test_postgres_nats_and_s3_keep_their_data_on_named_volumes() -> None:
    compose = load_compose()
    data_paths = {"postgres": "/var/lib/postgresql/data", "nats": "/data", "seaweedfs": "/data"}
    for name, path in data_paths.items():
        mounts = dict(reversed(m.split(":")[:2]) for m in compose["services"][name]["volumes"])
        assert mounts.get(path) in compose["volumes"], f"{name}: {path} is not on a named volume"


def test_every_long_running_service_has_a_health_check() -> None:
    compose = load_compose()
    steps = one_shot(compose)
    assert steps == {"migrations"}
    assert compose["services"]["migrations"]["restart"] == "no"
    for name, service in compose["services"].items():
        if name in steps:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    # The services' checks ask gRPC health (the same script the images ship).
    for name in ("identity", "datasets", "jobs", "estimation", "metrics", "serving"):
        assert compose["services"][name]["healthcheck"]["test"] == [
            "CMD", "python", "deploy/docker/healthcheck.py"], name


def test_services_start_after_the_migrations_step() -> None:
    compose = load_compose()
    for name in ("identity", "datasets", "jobs", "estimation", "metrics", "serving"):
        depends = compose["services"][name]["depends_on"]
        assert depends["migrations"] == {"condition": "service_completed_successfully"}, name
    assert compose["services"]["migrations"]["command"] == ["python", "deploy/docker/migrate.py"]


def test_no_secret_is_written_inline() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        mounted = secret_targets(service)
        for key, value in environment(service).items():
            if key.endswith("_FILE"):
                if value.startswith("/run/secrets/") or key == "TUNEFORGE_BOOTSTRAP_ADMIN_KEY_FILE":
                    assert value in mounted or key == "TUNEFORGE_BOOTSTRAP_ADMIN_KEY_FILE", \
                        f"{name}: {key} names {value}, which is not mounted"
                continue
            assert not (SECRET_NAME.search(key) and value), f"{name}: {key} is set inline"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{name}: {key} carries credentials"
        command = " ".join(map(str, service.get("command") or []))
        assert not re.search(r"password|secret", command.replace("/run/secrets/", ""), re.IGNORECASE), name


def test_every_secret_file_is_one_make_secrets_writes(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_secrets", DOCKER / "make_secrets.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wrote = set(module.make_secrets(tmp_path / "secrets"))
    compose = load_compose()
    for name, secret in compose["secrets"].items():
        file = Path(secret["file"])
        assert file.parent == Path("deploy/secrets"), name
        assert file.name in wrote, f"secret {name}: make_secrets.py does not write {file.name}"
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0
    assert (tmp_path / "secrets" / ".gitignore").read_text() == "*\n"
    # Run again: nothing is replaced, so a deployment keeps its passwords.
    before = (tmp_path / "secrets" / "postgres_password").read_text()
    assert module.make_secrets(tmp_path / "secrets") == []
    assert (tmp_path / "secrets" / "postgres_password").read_text() == before
    assert before.strip() in (tmp_path / "secrets" / "database_url").read_text()
    # The credentials key is one the datasets service accepts.
    from services.kit.credentials import CredentialCipher

    cipher = CredentialCipher.from_settings((tmp_path / "secrets" / "credentials_key").read_text().strip(),
                                            tmp_path / "unused")
    assert cipher.open(cipher.seal(b"import credentials")) == b"import credentials"
    assert not (tmp_path / "unused").exists()


def test_images_are_built_by_dockerfiles_that_exist() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        image = service["image"]
        if image.startswith("tuneforge-"):
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            assert service["build"]["context"] == "."
        else:
            tag = image.rsplit(":", 1)[-1]
            assert ":" in image and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"
    makefile = (ROOT / "Makefile").read_text()
    for dockerfile in DOCKERFILES:
        assert f"-f deploy/docker/{dockerfile.name}" in makefile, dockerfile.name


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_multi_stage_pinned_non_root_and_use_the_constraints(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2, "not multi-stage"
    for base in stages:
        image = args.get(base.strip("${}"), base)
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image} is not pinned"
    final = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the final stage runs as root"
    assert re.search(r"pip install -c constraints\.txt", text)
    assert "COPY constraints.txt" in text
    if "worker" in dockerfile.name:
        assert '".[train,postgres]"' in text and "import torch, trl, peft, deepspeed, bitsandbytes" in text
    else:
        assert '".[postgres]"' in text and '! python -c "import torch"' in text
    if "cuda" in dockerfile.name:
        assert "flash-attn" in text
    # Everything it copies exists, and .dockerignore does not leave it out of the context.
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert list(ROOT.glob(source)), f"COPY {source}: nothing there"
            assert not any(source == pattern or source.startswith(pattern + "/") for pattern in ignored), \
                f"COPY {source} is excluded by .dockerignore"


def test_the_gateway_routes_every_api_service_to_a_compose_service() -> None:
    compose = load_compose()
    envoy = yaml.safe_load(ENVOY.read_text())
    manager = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r["match"]["prefix"].strip("/"): r["route"]["cluster"]
              for r in manager["route_config"]["virtual_hosts"][0]["routes"]}
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    declared = {f"tuneforge.v1.{name}" for proto in (ROOT / "protos" / "tuneforge" / "v1").glob("*.proto")
                for name in re.findall(r"^service (\w+)", proto.read_text(), re.MULTILINE)}
    assert declared and declared == set(routes), (declared, set(routes))
    for service, cluster in routes.items():
        endpoint = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]["socket_address"]
        target = compose["services"][address["address"]]
        assert environment(target)["TUNEFORGE_GRPC_PORT"] == str(address["port_value"]), service
        assert target["command"] == ["python", "-m", f"services.{address['address']}"], service
        assert "http2_protocol_options" in json.dumps(clusters[cluster]["typed_extension_protocol_options"])
    gateway = compose["services"]["gateway"]
    assert any(c["target"] == "/etc/envoy/envoy.yaml" and compose["configs"][c["source"]]["file"] ==
               "./deploy/docker/envoy.yaml" for c in gateway["configs"])


def test_the_gpu_worker_reserves_nvidia_devices_in_its_own_profile() -> None:
    compose = load_compose()
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"] == "tuneforge-worker:cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in compose["services"]["worker-cpu"]
    assert environment(compose["services"]["worker-cpu"])["TUNEFORGE_WORKER_GPU_TYPE"] == "cpu"
