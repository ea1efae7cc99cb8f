"""deploy/k8s: every overlay builds with `kubectl kustomize`, every object validates against the Kubernetes
OpenAPI schema (kubernetes-validate, strict: unknown fields are errors), and the manifests keep the
promises deploy/k8s/README.md makes (probes, resources, non-root pods, GPU pools, a replicated NATS,
secrets only by reference, one gateway routing every gRPC service to the Deployment serving it).

No cluster runs here: the schemas and these checks are what is tested.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from services.jobs.scheduler import parse_worker_pools
from services.serving.manifest import VllmSource, render
from tuneforge_core import subjects

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# multinode: production plus components/ray (its KubeRay objects are checked by test_kuberay.py).
OVERLAYS = ("dev", "production", "multinode")
# The Kubernetes version the schemas are checked against (a version kubernetes-validate ships).
KUBERNETES_VERSION = "1.32.0"
# The images the base names logically; every overlay must map each to a built image with a tag.
LOGICAL_IMAGES = ("tuneforge-services", "tuneforge-worker-cpu", "tuneforge-worker-cuda")
SERVICES = ("identity", "datasets", "jobs", "estimation", "metrics", "serving")
GRPC_PORT = 50051

Doc = dict[str, Any]


@functools.cache
def build(target: str) -> tuple[Doc, ...]:
    """The objects `kubectl kustomize deploy/k8s/<target>` renders (target: "base" or "overlays/<name>")."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the kustomizations: `kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def overlay(name: str) -> tuple[Doc, ...]:
    return build(f"overlays/{name}")


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def config_map(docs: tuple[Doc, ...], prefix: str) -> Doc:
    """The generated or plain ConfigMap whose name is `prefix` (plus kustomize's hash suffix)."""
    found = [d for d in of_kind(docs, "ConfigMap")
             if re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    assert len(found) == 1, prefix
    return found[0]


def validation_errors(docs: tuple[Doc, ...] | list[Doc]) -> list[str]:
    """Every core object's schema violations. KubeRay's custom resources have no schema here: test_kuberay.py
    checks them against KubeRay's CRD (and their pod templates against this schema)."""
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at "
                          f"{'.'.join(str(p) for p in exc.path)}")
    return errors


# -- builds and schemas --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_object_validates_against_the_kubernetes_schema(target: str) -> None:
    docs = build(target)
    assert len(docs) > 20
    assert validation_errors(docs) == []


def test_the_example_secrets_validate_and_hold_only_placeholders() -> None:
    secrets = [d for d in yaml.safe_load_all((K8S / "examples" / "secrets.yaml").read_text()) if d]
    assert validation_errors(secrets) == []
    for secret in secrets:
        assert "data" not in secret, "examples hold placeholders in stringData only"
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value or value == "", \
                f"{secret['metadata']['name']}.{key} is not a placeholder"


def test_the_vllm_template_renders_to_valid_objects() -> None:
    """deploy/k8s/vllm stays where services/serving/manifest.py reads it, and what it renders validates."""
    source = VllmSource(deployment_id="dep_1", job_id="job_1", name="support-bot", base_model="org/base",
                        uri="s3://bucket/outputs/job_1/adapter", merged=False, lora_rank=16,
                        image="vllm/vllm-openai:v0.11.0", s3_region="us-east-1", s3_endpoint_url="")
    docs = [d for d in yaml.safe_load_all(render(source)) if d]
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert validation_errors(docs) == []


def test_a_schema_violation_is_caught() -> None:
    """The validation is strict: a misspelled field fails (so the tests above can fail)."""
    deployment = json.loads(json.dumps(named(overlay("dev"), "Deployment", "jobs")))
    pod_spec(deployment)["containers"][0]["readinesProbe"] = pod_spec(deployment)["containers"][0].pop(
        "readinessProbe")
    assert validation_errors([deployment])


# -- what every workload promises ------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_every_deployment_has_probes_and_resources(name: str) -> None:
    docs = overlay(name)
    for doc in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        for container in pod_spec(doc)["containers"]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_run_one_component_each_with_native_grpc_health_probes(name: str) -> None:
    docs = overlay(name)
    for service in SERVICES:
        deployment = named(docs, "Deployment", service)
        (container,) = pod_spec(deployment)["containers"]
        assert container["command"] == ["python", "-m", f"services.{service}"]
        assert (ROOT / "services" / service / "__main__.py").exists()
        assert {"name": "grpc", "containerPort": GRPC_PORT} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": GRPC_PORT}, f"{service}: {probe}"
        kube_service = named(docs, "Service", service)
        assert kube_service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        # A PodDisruptionBudget selects its pods.
        pdbs = [p for p in of_kind(docs, "PodDisruptionBudget")
                if p["spec"]["selector"]["matchLabels"].items()
                <= deployment["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pdbs) == 1, service


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_as_non_root_on_a_read_only_root_without_a_token(name: str) -> None:
    docs = overlay(name)
    for sa in of_kind(docs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]
    for doc in workloads(docs):
        spec = pod_spec(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"] in {s["metadata"]["name"] for s in of_kind(docs, "ServiceAccount")}
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_image_is_a_built_image_with_a_tag(name: str) -> None:
    for doc in workloads(overlay(name)):
        for container in pod_spec(doc)["containers"]:
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and tag and "/" not in tag, f"{image}: no tag"
            assert repository.rsplit("/", 1)[-1] not in LOGICAL_IMAGES[1:], f"{image}: not mapped"


@pytest.mark.parametrize("name", OVERLAYS)
def test_secrets_are_referenced_never_inlined_and_exist_in_the_examples(name: str) -> None:
    docs = overlay(name)
    assert of_kind(docs, "Secret") == []
    examples = {d["metadata"]["name"]: d["stringData"]
                for d in yaml.safe_load_all((K8S / "examples" / "secrets.yaml").read_text()) if d}
    for doc in workloads(docs):
        for container in pod_spec(doc)["containers"]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in examples
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in examples.get(ref["name"], {}), f"{ref} has no example"
                secret_like = re.search(r"(PASSWORD|TOKEN|_KEY$|DATABASE_URL)", env["name"])
                assert not secret_like or "valueFrom" in env, f"{env['name']} is inlined"


# -- workers ---------------------------------------------------------------------------------------------

def hardware_options() -> set[str]:
    catalog = json.loads((ROOT / "services" / "estimation" / "catalog" / "hardware.json").read_text())
    return {option["gpu_type"] for option in catalog["options"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_worker_pools_declare_their_hardware(name: str) -> None:
    docs = overlay(name)
    workers = [d for d in of_kind(docs, "Deployment")
               if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
    assert any(d["metadata"]["name"] == "worker-cpu" for d in workers)
    for doc in workers:
        spec = pod_spec(doc)
        (container,) = spec["containers"]
        assert container["command"] == ["python", "-m", "trainer_worker"]
        env = env_of(container)
        gpu_type = env["TUNEFORGE_WORKER_GPU_TYPE"]["value"]
        gpu_count = int(env["TUNEFORGE_WORKER_GPU_COUNT"]["value"])
        assert gpu_type in hardware_options(), gpu_type
        assert env["TUNEFORGE_NATS_USER"]["value"] == "worker"
        assert doc["metadata"]["labels"]["tuneforge.dev/pool"] == gpu_type
        # The worker pool it serves is the one its label names.
        assert env["TUNEFORGE_WORKER_POOL"]["value"] == gpu_type and subjects.valid_pool(gpu_type)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        if gpu_type == "cpu":
            assert gpu_count == 0 and "nvidia.com/gpu" not in limits
            continue
        # A GPU pool: its GPUs are requested, its nodes selected and their taint tolerated, and the worker
        # is told what it has (so it pulls its type's queue).
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == gpu_count >= 1
        assert spec["nodeSelector"], doc["metadata"]["name"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert container["image"].endswith("-cuda")


@pytest.mark.parametrize("name", ["production", "multinode"])
def test_the_jobs_service_knows_every_worker_pool_and_its_largest_worker(name: str) -> None:
    """TUNEFORGE_WORKER_POOLS (what CreateJob refuses by) declares exactly the pools the Deployments run."""
    docs = overlay(name)
    deployed = set()
    for doc in of_kind(docs, "Deployment"):
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
            env = env_of(pod_spec(doc)["containers"][0])
            deployed.add((env["TUNEFORGE_WORKER_POOL"]["value"], env["TUNEFORGE_WORKER_GPU_TYPE"]["value"],
                          int(env["TUNEFORGE_WORKER_GPU_COUNT"]["value"])))
    declared = parse_worker_pools(config_map(docs, "tuneforge-config")["data"]["TUNEFORGE_WORKER_POOLS"])
    assert {(p.name, p.gpu_type, p.gpu_count) for p in declared} == deployed


def test_production_has_gpu_pools_and_dev_a_cpu_worker_only() -> None:
    def gpu_pools(docs: tuple[Doc, ...]) -> set[str]:
        return {d["metadata"]["labels"]["tuneforge.dev/pool"] for d in of_kind(docs, "Deployment")
                if d["metadata"]["labels"].get("tuneforge.dev/pool", "cpu") != "cpu"}

    assert gpu_pools(overlay("production")) == {"nvidia-h100", "nvidia-a100-80gb"}
    assert gpu_pools(overlay("dev")) == set()


# -- NATS ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "replicas"), [("dev", 1), ("production", 3)])
def test_nats_replicas_match_the_stream_replicas_and_sync_always(name: str, replicas: int) -> None:
    docs = overlay(name)
    nats = named(docs, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == replicas
    assert config_map(docs, "tuneforge-config")["data"]["TUNEFORGE_NATS_STREAM_REPLICAS"] == str(replicas)
    conf = config_map(docs, "nats-config")["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    routes = re.findall(r"nats://(nats-\d+)\.nats-headless:6222", conf)
    assert len(routes) == (replicas if replicas > 1 else 0)
    # The StatefulSet mounts the generated config (its name carries the content hash).
    volumes = {v["name"]: v for v in pod_spec(nats)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map(docs, "nats-config")["metadata"]["name"]
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# -- network and gateway ---------------------------------------------------------------------------------

def selects(policy: Doc, labels: dict[str, str]) -> bool:
    wanted: dict[str, str] = policy["spec"]["podSelector"].get("matchLabels", {})
    return wanted.items() <= labels.items()


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_deny_by_default_and_follow_the_service_graph(name: str) -> None:
    docs = overlay(name)
    policies = of_kind(docs, "NetworkPolicy")
    default = named(docs, "NetworkPolicy", "default-deny")
    assert default["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    def allowed_callers(service: str) -> set[str]:
        labels = named(docs, "Deployment", service)["spec"]["template"]["metadata"]["labels"]
        callers = set()
        for policy in policies:
            if "Ingress" in policy["spec"]["policyTypes"] and selects(policy, labels):
                for rule in policy["spec"].get("ingress", []):
                    for peer in rule.get("from", []):
                        component = peer.get("podSelector", {}).get("matchLabels", {}).get(
                            "app.kubernetes.io/component")
                        if component:
                            callers.add(component)
        return callers

    # README's service graph: jobs -> datasets, estimation; estimation -> datasets; metrics, serving -> jobs;
    # and the HTTP gateway's gRPC router (`gateway`, base/http.yaml) -> every service
    # (test_k8s_http_gateway.py checks who reaches the router, port by port).
    assert allowed_callers("datasets") == {"jobs", "estimation", "gateway"}
    assert allowed_callers("estimation") == {"jobs", "gateway"}
    assert allowed_callers("jobs") == {"metrics", "serving", "gateway"}
    for service in ("identity", "metrics", "serving"):
        assert allowed_callers(service) == {"gateway"}
    # Workers take no connections; they reach NATS (and S3) by their labels.
    worker_labels = named(docs, "Deployment", "worker-cpu")["spec"]["template"]["metadata"]["labels"]
    assert worker_labels["tuneforge.dev/nats-client"] == "true"
    assert worker_labels["tuneforge.dev/s3-client"] == "true"
    assert "tuneforge.dev/database-client" not in worker_labels
    assert not any(p["spec"].get("ingress") and selects(p, worker_labels) for p in policies)


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_gateway_routes_every_grpc_service_to_the_deployment_serving_it(name: str) -> None:
    docs = overlay(name)
    routes = {}
    for ingress in of_kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                routes[path["path"]] = path["backend"]["service"]
    declared = set()
    for proto in (ROOT / "protos" / "tuneforge" / "v1").glob("*.proto"):
        declared |= set(re.findall(r"^service (\w+) \{", proto.read_text(), re.M))
    assert declared
    for service_name in declared:
        backend = routes.get(f"/tuneforge.v1.{service_name}/")
        assert backend is not None, f"{service_name} is not routed"
        assert backend["port"] == {"name": "grpc"}
        package = ROOT / "services" / backend["name"]
        assert any(service_name in f.read_text() for f in package.glob("*.py")), \
            f"{service_name} routed to {backend['name']}, which does not serve it"
    assert routes["/v1/"] == {"name": "serving", "port": {"name": "http"}}


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_namespaced_object_is_in_the_tuneforge_namespace(name: str) -> None:
    """An object without a namespace goes to kubectl's current one (usually `default`), away from the
    ConfigMap, Secrets, ServiceAccounts and Services it names."""
    cluster_wide = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                    "PriorityClass", "StorageClass", "PersistentVolume", "IngressClass"}
    astray = [f"{d['kind']} {d['metadata']['name']}: {d['metadata'].get('namespace')!r}"
              for d in build(f"overlays/{name}")
              if d["kind"] not in cluster_wide and d["metadata"].get("namespace") != "tuneforge"]
    assert astray == []


@pytest.mark.parametrize("name", ["production", "multinode"])
def test_the_migrations_step_applies_all_the_job_needs(name: str) -> None:
    """deploy/k8s/README.md step 1 applies what carries the label `app.kubernetes.io/component in
    (migrations,postgres)`: the Job, its ServiceAccount, and the `postgres` Service its database URL names.
    The Secrets are created by hand before (their names are checked elsewhere)."""
    docs = build(f"overlays/{name}")
    selected = [d for d in docs if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
                in ("migrations", "postgres")]
    names = {(d["kind"], d["metadata"]["name"]) for d in selected}
    jobs = [d for d in selected if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["tuneforge-migrations"]
    account = jobs[0]["spec"]["template"]["spec"]["serviceAccountName"]
    assert ("ServiceAccount", account) in names
    assert ("Service", "postgres") in names
    assert "migrations,postgres" in (K8S / "README.md").read_text()
