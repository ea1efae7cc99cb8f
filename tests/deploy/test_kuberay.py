"""deploy/k8s/components/ray (overlays/multinode): the KubeRay RayCluster multi-node jobs run on, the
ReadWriteMany work volume it shares with the trainer workers, the NetworkPolicies that keep Ray's ports to
this cluster and its drivers, and the patch making the GPU pools' trainer workers Ray drivers.

kubernetes-validate has no schema for KubeRay's custom resources: the RayCluster is validated against
KubeRay's own CRD schema (tests/deploy/kuberay: the v1.7.0 CRD's openAPIV3Schema with the embedded core
objects cut out, strict as kubernetes-validate is: an unknown field is an error), and each pod template it
embeds against the Kubernetes schema as the core PodTemplate it is. The NetworkPolicies are evaluated, not
just read: which peers may open which port of which pod, as a CNI enforcing them would decide.

No cluster runs here: the schemas and these checks are what is tested.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from tests.deploy.test_k8s_manifests import (
    Doc,
    config_map,
    env_of,
    named,
    of_kind,
    overlay,
    pod_spec,
    validation_errors,
)
from trainer_worker import ray_launch

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("kuberay") / "raycluster-v1.schema.json"
CLUSTER = "tuneforge-ray"
HEAD_ADDRESS = f"{CLUSTER}-head-svc:6379"
# Ray's well-known ports (GCS, client server, dashboard and Jobs API, metrics), the raylet's (pinned by the
# groups' rayStartParams) and one of the worker-process range (10002-19999).
RAY_PORTS = (6379, 10001, 8265, 8080, 6380, 12345)
NAMESPACE = "tuneforge"

Labels = dict[str, str]


@functools.cache
def multinode() -> tuple[Doc, ...]:
    return overlay("multinode")


def ray_cluster() -> Doc:
    return named(multinode(), "RayCluster", CLUSTER)


def groups() -> dict[str, Doc]:
    """The RayCluster's head group ("headgroup", as KubeRay names it) and each worker group, by name."""
    return groups_of(ray_cluster())


def ray_pod_labels(group: str) -> Labels:
    """The labels a pod of `group` carries once KubeRay has made it: the template's and the operator's
    (ray-operator/controllers/ray/utils/constant.go: ray.io/cluster, node-type, group, is-ray-node)."""
    template_labels: Labels = groups()[group]["template"]["metadata"]["labels"]
    node_type = "head" if group == "headgroup" else "worker"
    return {**template_labels, "ray.io/cluster": CLUSTER, "ray.io/node-type": node_type,
            "ray.io/group": group, "ray.io/is-ray-node": "yes"}


def gpu_pools() -> list[Doc]:
    return [d for d in of_kind(multinode(), "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
            and d["metadata"]["labels"]["tuneforge.dev/pool"] != "cpu"]


def data_dir() -> str:
    value: str = config_map(multinode(), "tuneforge-config")["data"]["TUNEFORGE_DATA_DIR"]
    return value


# -- the RayCluster against KubeRay's CRD -------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others (the API server would drop an
    unknown field of a custom resource silently: here it is an error)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def raycluster_validator() -> Any:
    return jsonschema.Draft7Validator(strict(json.loads(SCHEMA.read_text())))


def raycluster_errors(doc: Doc) -> list[str]:
    """Violations of KubeRay's CRD schema, then of the Kubernetes schema by each embedded pod template."""
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
              for e in raycluster_validator().iter_errors(doc)]
    for name, group in groups_of(doc).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                    "template": group["template"]}
        errors += validation_errors([template])
    return errors


def groups_of(doc: Doc) -> dict[str, Doc]:
    spec = doc["spec"]
    workers = spec.get("workerGroupSpecs", [])
    return {"headgroup": spec["headGroupSpec"],
            **{g.get("groupName", f"workerGroupSpecs[{i}]"): g for i, g in enumerate(workers)}}


def test_the_ray_cluster_validates_against_the_kuberay_crd_and_its_pods_against_kubernetes() -> None:
    assert ray_cluster()["apiVersion"] == "ray.io/v1"
    assert ray_cluster()["metadata"]["namespace"] == NAMESPACE
    assert raycluster_errors(ray_cluster()) == []


@pytest.mark.parametrize(("where", "change"), [
    ("a misspelled group field", lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3)),
    ("a missing required field", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")),
    ("a wrong type", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
    ("a misspelled pod field", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(
        nodeSelecter={"a": "b"})),
])
def test_a_schema_violation_of_the_ray_cluster_is_caught(where: str, change: Any) -> None:
    doc = copy.deepcopy(ray_cluster())
    change(doc)
    assert raycluster_errors(doc), where


def test_only_the_multinode_overlay_needs_kuberay() -> None:
    """production and dev apply on a cluster without the KubeRay operator: no ray.io object in them."""
    for name in ("dev", "production"):
        assert not [d for d in overlay(name) if d["apiVersion"].startswith("ray.io/")], name
    assert [d["kind"] for d in multinode() if d["apiVersion"].startswith("ray.io/")] == ["RayCluster"]


# -- versions and images -----------------------------------------------------------------------------------

def constraint(package: str) -> str:
    pins = re.findall(rf"^{re.escape(package)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, f"constraints.txt pins {package} {len(pins)} times"
    return pins[0]


def test_the_ray_version_is_the_one_the_worker_image_installs() -> None:
    """rayVersion is constraints.txt's ray pin, and the CUDA worker image installs ray from an extra of
    pyproject.toml under those constraints: the driver and every rank run the same Ray."""
    assert ray_cluster()["spec"]["rayVersion"] == constraint("ray")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    with_ray = {extra for extra, requirements in extras.items()
                if any(re.match(r"ray(\[[\w,]+\])?\b", r) for r in requirements)}
    dockerfile = (ROOT / "deploy" / "docker" / "worker-cuda.Dockerfile").read_text()
    (installed,) = re.findall(r"for e in '([\w,]+)'\.split", dockerfile)
    assert with_ray & set(installed.split(",")), f"the image installs {installed}; ray is in {with_ray}"
    assert "-c constraints.txt" in dockerfile


def test_every_ray_pod_and_ray_node_runs_the_trainer_workers_image() -> None:
    (worker_image,) = {pod_spec(d)["containers"][0]["image"] for d in gpu_pools()}
    assert ":" in worker_image and worker_image.endswith("-cuda")
    for name, group in groups().items():
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == worker_image, name
    for doc in gpu_pools():
        for container in pod_spec(doc)["initContainers"]:
            assert container["image"] == worker_image, doc["metadata"]["name"]


# -- the head and the groups -------------------------------------------------------------------------------

def test_the_head_runs_no_ranks_and_exposes_nothing_outside_the_cluster() -> None:
    head = groups()["headgroup"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    # No dashboard, so no Jobs API; turned on, it would listen on the pod's loopback only.
    assert params["include-dashboard"] == "false" and params["dashboard-host"] == "127.0.0.1"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {p["containerPort"] for p in container["ports"]} == {6379, 10001, 8265, 8080}
    # KubeRay's head Service stays ClusterIP (headless by default), with no Ingress of its own ...
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False) and "headService" not in head
    assert "autoscalerOptions" not in ray_cluster()["spec"]
    # ... and nothing in the overlay publishes a Ray port: no LoadBalancer or NodePort, no Ingress to it.
    for service in of_kind(multinode(), "Service"):
        assert service["spec"].get("type", "ClusterIP") in ("ClusterIP", "ExternalName"), service["metadata"]
    for ingress in of_kind(multinode(), "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert "ray" not in path["backend"]["service"]["name"]


def test_one_gpu_group_per_gpu_pool_on_the_same_nodes_and_gpus() -> None:
    pools = {d["metadata"]["labels"]["tuneforge.dev/pool"]: d for d in gpu_pools()}
    workers = {name: g for name, g in groups().items() if name != "headgroup"}
    assert set(workers) == set(pools) == {"nvidia-h100", "nvidia-a100-80gb"}
    for name, group in workers.items():
        pool_spec, ray_spec = pod_spec(pools[name]), group["template"]["spec"]
        (worker,), (ray_worker,) = pool_spec["containers"], ray_spec["containers"]
        assert ray_spec["nodeSelector"] == pool_spec["nodeSelector"], name
        assert ray_spec["tolerations"] == pool_spec["tolerations"], name
        gpus = int(env_of(worker)["TUNEFORGE_WORKER_GPU_COUNT"]["value"])
        for kind in ("requests", "limits"):
            assert ray_worker["resources"][kind]["nvidia.com/gpu"] == gpus, name
        # Ray labels the node with the pool's hardware option, which a GPU job's ranks select.
        assert group["labels"] == {ray_launch.GPU_TYPE_LABEL: name}
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # The probes check the raylet on the port its rayStartParams pin.
        port = int(group["rayStartParams"]["node-manager-port"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert ray_worker[probe]["tcpSocket"] == {"port": port}, name


def test_ray_pods_meet_the_restricted_pod_security_standard() -> None:
    service_accounts = {d["metadata"]["name"]: d for d in of_kind(multinode(), "ServiceAccount")}
    for name, group in groups().items():
        spec = group["template"]["spec"]
        assert service_accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # The same user as the trainer workers: the ranks read the agent's private (0700) work dirs.
        assert spec["securityContext"]["runAsUser"] == 10001
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/dev/shm"} <= mounts, f"{name}: Ray writes its sessions to /tmp/ray"


# -- the shared work volume ------------------------------------------------------------------------------

def mounted_claims(spec: Doc, container: Doc) -> dict[str, str]:
    """mount path -> claim name of each PersistentVolumeClaim `container` mounts."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"] if m["name"] in claims}


def test_the_work_dir_is_one_read_write_many_volume_at_the_same_path_everywhere() -> None:
    work_dir = f"{data_dir()}/worker"  # the agent's work_root: TUNEFORGE_DATA_DIR/worker
    (claim,) = of_kind(multinode(), "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    expected = {work_dir: claim["metadata"]["name"]}
    for name, group in groups().items():
        spec = group["template"]["spec"]
        for container in spec["containers"]:
            assert mounted_claims(spec, container) == expected, name
    assert gpu_pools()
    for doc in gpu_pools():
        spec = pod_spec(doc)
        for container in spec["containers"] + spec["initContainers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert mounted_claims(spec, container) == expected, where
    # The CPU pool keeps its own disk: it drives no Ray job.
    cpu = pod_spec(named(multinode(), "Deployment", "worker-cpu"))
    assert mounted_claims(cpu, cpu["containers"][0]) == {}


# -- the drivers -----------------------------------------------------------------------------------------

def test_the_gpu_pools_trainer_workers_drive_the_ray_cluster_from_a_ray_node_of_their_own() -> None:
    (head,) = groups()["headgroup"]["template"]["spec"]["containers"]
    assert int(HEAD_ADDRESS.rpartition(":")[2]) in {p["containerPort"] for p in head["ports"]}
    for doc in gpu_pools():
        where = doc["metadata"]["name"]
        spec = pod_spec(doc)
        (worker,) = spec["containers"]
        assert env_of(worker)["TUNEFORGE_RAY_ADDRESS"]["value"] == HEAD_ADDRESS, where
        assert spec["securityContext"]["runAsUser"] == 10001
        assert doc["spec"]["template"]["metadata"]["labels"]["tuneforge.dev/ray-driver"] == "true"
        # The Ray node beside the agent: a native sidecar (started first, restarted on exit) joining the same
        # cluster with nothing for ranks, sharing the agent's /tmp (Ray's sockets) and /dev/shm.
        (node,) = spec["initContainers"]
        assert node["restartPolicy"] == "Always", where
        script = " ".join(node["command"])
        assert f"ray start --address={HEAD_ADDRESS} --num-cpus=0 --num-gpus=0" in script, where
        assert "--block" in script and "while true" in script, where
        assert env_of(node)["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
        assert "nvidia.com/gpu" not in node["resources"]["limits"]
        volume_at = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        for path in ("/tmp", "/dev/shm"):
            assert {"mountPath": path, "name": volume_at[path]} in node["volumeMounts"], f"{where}: {path}"
        sc = node["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    cpu = named(multinode(), "Deployment", "worker-cpu")
    assert "TUNEFORGE_RAY_ADDRESS" not in env_of(pod_spec(cpu)["containers"][0])
    assert "initContainers" not in pod_spec(cpu)
    assert "tuneforge.dev/ray-driver" not in cpu["spec"]["template"]["metadata"]["labels"]


# -- who may reach Ray's ports ---------------------------------------------------------------------------

def matches(selector: Doc, labels: Labels) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        found = {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                 "Exists": present, "DoesNotExist": not present}[operator]
        if not found:
            return False
    return True


def peer_matches(peer: Doc, namespace: Labels, pod: Labels) -> bool:
    """Whether a pod (its namespace's labels, its own labels) is this NetworkPolicy peer. A peer with a
    podSelector and no namespaceSelector means this namespace only; an ipBlock means anyone."""
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace):
            return False
    elif namespace.get("kubernetes.io/metadata.name") != NAMESPACE:
        return False
    return matches(peer.get("podSelector", {}), pod)


def port_matches(rule: Doc, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == "TCP"
               and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
               for p in ports)


def admits(pod: Labels, direction: str, port: int, peer_namespace: Labels, peer: Labels) -> bool:
    """Whether the policies of the overlay let `peer` reach `pod` on `port` (direction "Ingress"), or `pod`
    reach `peer` on `port` ("Egress"): allowed when a policy selecting the pod for that direction has a
    rule admitting the peer and port. Every pod is selected by default-deny, so none is open by default."""
    side = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    selecting = [p for p in of_kind(multinode(), "NetworkPolicy")
                 if direction in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod)]
    assert selecting, f"no {direction} policy selects {pod}"
    return any(port_matches(rule, port) and (not rule.get(side[1]) or any(
        peer_matches(p, peer_namespace, peer) for p in rule[side[1]]))
        for policy in selecting for rule in policy["spec"].get(side[0], []))


def namespace_labels(name: str) -> Labels:
    return {"kubernetes.io/metadata.name": name}


def template_labels(name: str) -> Labels:
    labels: Labels = named(multinode(), "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("port", RAY_PORTS)
def test_ray_ports_admit_this_cluster_and_its_drivers_only(port: int) -> None:
    """ShadowRay (CVE-2023-48022): Ray's head and nodes run what they are sent. The policies admit the
    cluster's own pods and the trainer workers that drive it, and nothing else: not the ingress controller,
    not Prometheus, not TuneForge's services or CPU workers, not a pod of another namespace that copies the
    cluster's labels."""
    ours = namespace_labels(NAMESPACE)
    head, h100 = ray_pod_labels("headgroup"), ray_pod_labels("nvidia-h100")
    allowed = {
        "a Ray worker": (ours, h100),
        "another group's Ray worker": (ours, ray_pod_labels("nvidia-a100-80gb")),
        "the head": (ours, head),
        "a GPU pool's trainer worker": (ours, template_labels("worker-nvidia-h100")),
    }
    denied = {
        "the ingress controller": (namespace_labels("ingress-nginx"), {"app.kubernetes.io/name": "nginx"}),
        "Prometheus": (namespace_labels("monitoring"), {"app.kubernetes.io/name": "prometheus"}),
        "a pod of another namespace with the cluster's labels": (namespace_labels("default"), h100),
        "the jobs service": (ours, template_labels("jobs")),
        "the CPU worker": (ours, template_labels("worker-cpu")),
        "NATS": (ours, named(multinode(), "StatefulSet", "nats")["spec"]["template"]["metadata"]["labels"]),
    }
    for target in (head, h100):
        group = target["ray.io/group"]
        for who, (namespace, labels) in allowed.items():
            assert admits(target, "Ingress", port, namespace, labels), f"{who} -> {group}:{port}"
        for who, (namespace, labels) in denied.items():
            assert not admits(target, "Ingress", port, namespace, labels), f"{who} -> {group}:{port}"
    # The other way: a driver may reach the head and accepts the Ray nodes' connections (its own Ray node's
    # and driver's ports), and a Ray node may reach the drivers; a CPU worker may not reach the head.
    driver = template_labels("worker-nvidia-h100")
    assert admits(driver, "Egress", port, ours, head)
    assert admits(driver, "Ingress", port, ours, h100)
    assert admits(h100, "Egress", port, ours, driver)
    assert not admits(template_labels("worker-cpu"), "Egress", port, ours, head)
    assert not admits(driver, "Ingress", port, namespace_labels("ingress-nginx"), {})


def test_the_ray_policies_name_peers_by_label_in_this_namespace_only() -> None:
    for name in ("ray-cluster", "ray-drivers"):
        policy = named(multinode(), "NetworkPolicy", name)
        for rule in policy["spec"]["ingress"] + policy["spec"]["egress"]:
            for peer in rule.get("from", []) + rule.get("to", []):
                assert set(peer) == {"podSelector"}, f"{name}: {peer}"
    # The cluster's pods are selected by the label KubeRay puts on every one of them.
    assert named(multinode(), "NetworkPolicy", "ray-cluster")["spec"]["podSelector"] == {
        "matchLabels": {"ray.io/cluster": CLUSTER}}


# -- the docs --------------------------------------------------------------------------------------------

def test_the_multinode_docs_name_files_that_exist() -> None:
    text = (ROOT / "docs" / "multinode.md").read_text()
    paths = set(re.findall(r"`?(deploy/k8s/[\w./-]+)", text))
    assert {"deploy/k8s/components/ray", "deploy/k8s/overlays/multinode"} <= {p.rstrip("/.") for p in paths}
    for path in paths:
        assert (ROOT / path.rstrip(".")).exists(), path
    assert "CVE-2023-48022" in text and "TUNEFORGE_RAY_ADDRESS" in text

