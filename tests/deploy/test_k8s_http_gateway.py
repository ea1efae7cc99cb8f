"""deploy/k8s: the HTTP/JSON gateway and web console (`http`, base/http.yaml) and its in-cluster gRPC router
(`gateway`, Envoy): what they run, how they are probed, that the router is compose's Envoy routing exactly
as the gRPC Ingress does, and, evaluating the NetworkPolicies port by port, that user traffic reaches the
HTTP gateway only from the ingress controller, the HTTP gateway reaches nothing but the router, and the
router nothing but the services' gRPC port.

The HTTP gateway's own process is started with the container's rendered environment and answers the probe
path; Envoy has no local binary here, so its config is checked against compose's (which
tests/deploy/test_compose_schema.py and test_compose_commands.py check against the services).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.deploy.test_k8s_manifests import (
    OVERLAYS,
    SERVICES,
    Doc,
    config_map,
    env_of,
    named,
    of_kind,
    overlay,
    pod_spec,
)
from tests.deploy.test_kuberay import matches, peer_matches, port_matches

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_ENVOY = ROOT / "deploy" / "docker" / "envoy.yaml"
NAMESPACE = "tuneforge"
GRPC_PORT = 50051
HTTP_SETTINGS = ("TUNEFORGE_HTTP_HOST", "TUNEFORGE_HTTP_PORT", "TUNEFORGE_GATEWAY_GRPC_TARGET")

Labels = dict[str, str]


def container(docs: tuple[Doc, ...], name: str) -> Doc:
    (only,) = pod_spec(named(docs, "Deployment", name))["containers"]
    return only


def template_labels(docs: tuple[Doc, ...], kind: str, name: str) -> Labels:
    labels: Labels = named(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def probes(c: Doc) -> dict[str, Doc]:
    return {p: c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c}


def port_number(c: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def service_target(docs: tuple[Doc, ...], address: str) -> tuple[Doc, Doc]:
    """The Service an in-cluster `host:port` names and the Deployment whose container port it forwards to."""
    host, _, port = address.rpartition(":")
    service = named(docs, "Service", host)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    deployments = [d for d in of_kind(docs, "Deployment")
                   if matches({"matchLabels": service["spec"]["selector"]}, d["spec"]["template"]["metadata"]
                              ["labels"])]
    assert len(deployments) == 1, f"{address}: {len(deployments)} Deployments behind it"
    return service_port, deployments[0]


def pdbs_of(docs: tuple[Doc, ...], name: str) -> list[Doc]:
    labels = template_labels(docs, "Deployment", name)
    return [p for p in of_kind(docs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]


def envoy_config(docs: tuple[Doc, ...]) -> Doc:
    data: Doc = yaml.safe_load(config_map(docs, "envoy-config")["data"]["envoy.yaml"])
    return data


def envoy_routes(config: Doc) -> dict[str, tuple[str, int]]:
    """Envoy's route prefix -> (upstream host, port) of the cluster it goes to."""
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    clusters = {}
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        clusters[cluster["name"]] = (address["address"], int(address["port_value"]))
    (host,) = manager["route_config"]["virtual_hosts"]
    return {r["match"]["prefix"]: clusters[r["route"]["cluster"]] for r in host["routes"]}


def headless_upstreams(config: Doc) -> Doc:
    """Compose's Envoy config with each upstream host `<name>` named `<name>-pods` (the Kubernetes copy)."""
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                address["address"] = f"{address['address']}-pods"
    return config


def compose() -> dict[str, Any]:
    if not COMPOSE.exists():
        pytest.skip("docker-compose.yml does not exist")
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# -- what runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_the_http_gateway_runs_services_gateway_probed_on_healthz(name: str) -> None:
    docs = overlay(name)
    deployment = named(docs, "Deployment", "http")
    http = container(docs, "http")
    assert http["command"] == ["python", "-m", "services.gateway"]
    assert (ROOT / "services" / "gateway" / "__main__.py").exists()
    # The services' image (a release ships them together).
    assert http["image"] == container(docs, "identity")["image"]
    env = env_of(http)
    listen = int(env["TUNEFORGE_HTTP_PORT"]["value"])
    assert env["TUNEFORGE_HTTP_HOST"]["value"] == "0.0.0.0"
    assert {"name": "http", "containerPort": listen} in http["ports"]
    assert set(probes(http)) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in probes(http).items():
        assert probe["httpGet"]["path"] == "/healthz", kind
        assert port_number(http, probe["httpGet"]["port"]) == listen, kind
        assert probe.get("httpGet", {}).get("scheme", "HTTP") == "HTTP", kind  # no TLS settings mounted
    # Its Service forwards to that port, one PDB covers it, maxUnavailable 0 on rollout.
    service_port, behind = service_target(docs, f"http:{listen}")
    assert behind["metadata"]["name"] == "http"
    assert port_number(http, service_port["targetPort"]) == listen
    assert len(pdbs_of(docs, "http")) == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_http_gateway_holds_no_secret_and_no_backend_access(name: str) -> None:
    """It forwards each caller's Authorization header: no service token, no database, NATS or S3."""
    docs = overlay(name)
    for deployment in ("http", "gateway"):
        c = container(docs, deployment)
        assert not any("secretRef" in s for s in c.get("envFrom", [])), deployment
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])), deployment
        assert not [e["name"] for e in c.get("env", []) if e["name"] in (
            "TUNEFORGE_SERVICE_TOKEN", "TUNEFORGE_DATABASE_URL", "TUNEFORGE_NATS_PASSWORD")]
        labels = template_labels(docs, "Deployment", deployment)
        for label in ("tuneforge.dev/nats-client", "tuneforge.dev/database-client", "tuneforge.dev/s3-client",
                      "tuneforge.dev/metrics"):
            assert label not in labels, f"{deployment}: {label}"
        assert pod_spec(named(docs, "Deployment", deployment))["serviceAccountName"] == "tuneforge-gateway"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_http_gateway_calls_the_router_which_is_composes_envoy(name: str) -> None:
    docs = overlay(name)
    target = env_of(container(docs, "http"))["TUNEFORGE_GATEWAY_GRPC_TARGET"]["value"]
    service_port, router = service_target(docs, target)
    assert router["metadata"]["name"] == "gateway"
    envoy = container(docs, "gateway")
    config = envoy_config(docs)
    # The same config as compose's Envoy (comments aside) but for the upstream hosts, which are the
    # services' headless Services here, mounted where the command reads it.
    assert config == headless_upstreams(yaml.safe_load(COMPOSE_ENVOY.read_text()))
    args = envoy["command"]
    config_path = Path(args[args.index("-c") + 1])
    (mount,) = [m for m in envoy["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod_spec(router)["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map(docs, "envoy-config")["metadata"]["name"]
    assert config_path.name == "envoy.yaml"
    # Hot restart needs /dev/shm writable; the root file system is read-only.
    assert "--disable-hot-restart" in args
    # The Service forwards to Envoy's listener; the admin interface (it can stop Envoy) stays on loopback.
    (listener,) = config["static_resources"]["listeners"]
    listen = int(listener["address"]["socket_address"]["port_value"])
    assert port_number(envoy, service_port["targetPort"]) == listen
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert not any(p["containerPort"] == config["admin"]["address"]["socket_address"]["port_value"]
                   for p in envoy["ports"])
    for kind, probe in probes(envoy).items():
        if "tcpSocket" in probe:
            assert port_number(envoy, probe["tcpSocket"]["port"]) == listen, kind
        else:
            assert "127.0.0.1/9901" in " ".join(probe["exec"]["command"]) and "/ready" in " ".join(
                probe["exec"]["command"]), kind
    assert "readinessProbe" in envoy and "exec" in envoy["readinessProbe"]
    assert len(pdbs_of(docs, "gateway")) == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_router_routes_every_grpc_service_as_the_ingress_does(name: str) -> None:
    docs = overlay(name)
    routes = envoy_routes(envoy_config(docs))
    grpc_ingress = named(docs, "Ingress", "tuneforge")
    ingress = {path["path"]: path["backend"]["service"]["name"]
               for rule in grpc_ingress["spec"]["rules"] for path in rule["http"]["paths"]}
    assert set(routes) == set(ingress)
    for prefix, (host, port) in routes.items():
        # The headless twin of the Service the Ingress names: every ready pod of the same Deployment, so
        # Envoy spreads the calls over the replicas (a ClusterIP keeps an HTTP/2 connection on one).
        assert host == f"{ingress[prefix]}-pods", prefix
        assert named(docs, "Service", host)["spec"]["clusterIP"] == "None", host
        service_port, deployment = service_target(docs, f"{host}:{port}")
        assert service_port["name"] == "grpc" and port == GRPC_PORT
        assert deployment["metadata"]["name"] in SERVICES
        _, ingress_deployment = service_target(docs, f"{ingress[prefix]}:{port}")
        assert deployment is ingress_deployment, prefix


# -- who may reach whom ----------------------------------------------------------------------------------

def admits(docs: tuple[Doc, ...], pod: Labels, direction: str, port: int, peer_namespace: Labels,
           peer: Labels) -> bool:
    """The overlay's NetworkPolicies let `peer` reach `pod` on `port` (Ingress) or `pod` reach `peer`
    (Egress). Every pod is selected by default-deny, so none is open by default."""
    side = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    selecting = [p for p in of_kind(docs, "NetworkPolicy")
                 if direction in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod)]
    assert selecting, f"no {direction} policy selects {pod}"
    return any(port_matches(rule, port) and (not rule.get(side[1]) or any(
        peer_matches(p, peer_namespace, peer) for p in rule[side[1]]))
        for policy in selecting for rule in policy["spec"].get(side[0], []))


def ns(name: str) -> Labels:
    return {"kubernetes.io/metadata.name": name}


def connects(docs: tuple[Doc, ...], source: tuple[Labels, Labels], target: tuple[Labels, Labels],
             port: int) -> bool:
    """A connection is made when the source's egress and the target's ingress both allow it; a side in
    another namespace has no policy of ours (anything it sends or accepts is up to its own)."""
    ours = ns(NAMESPACE)
    allowed = True
    if source[0] == ours:
        allowed &= admits(docs, source[1], "Egress", port, target[0], target[1])
    if target[0] == ours:
        allowed &= admits(docs, target[1], "Ingress", port, source[0], source[1])
    return allowed


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_admit_user_traffic_to_the_http_gateway_from_the_ingress_controller_only(
        name: str) -> None:
    docs = overlay(name)
    ours = ns(NAMESPACE)
    http = (ours, template_labels(docs, "Deployment", "http"))
    router = (ours, template_labels(docs, "Deployment", "gateway"))
    services = {s: (ours, template_labels(docs, "Deployment", s)) for s in SERVICES}
    nats = (ours, template_labels(docs, "StatefulSet", "nats"))
    controller = (ns("ingress-nginx"), {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = (ns("monitoring"), {"app.kubernetes.io/name": "prometheus"})
    outside = (ns("default"), template_labels(docs, "Deployment", "http"))  # copies the labels
    anywhere: tuple[Labels, Labels] = ({}, {})  # an address outside the cluster (ipBlock peers)
    http_port = int(env_of(container(docs, "http"))["TUNEFORGE_HTTP_PORT"]["value"])
    router_port = int(container(docs, "gateway")["ports"][0]["containerPort"])

    def accepts(target: tuple[Labels, Labels], source: tuple[Labels, Labels], port: int) -> bool:
        """The target's own Ingress policies alone (whatever the source's egress says)."""
        return admits(docs, target[1], "Ingress", port, source[0], source[1])

    def sends(source: tuple[Labels, Labels], target: tuple[Labels, Labels], port: int) -> bool:
        """The source's own Egress policies alone."""
        return admits(docs, source[1], "Egress", port, target[0], target[1])

    # User traffic: the ingress controller reaches the HTTP gateway and nothing of it but its port.
    assert connects(docs, controller, http, http_port)
    assert not accepts(http, controller, 9090)
    assert not accepts(router, controller, router_port)
    # Nobody else gets in, by the HTTP gateway's and the router's own policies (not merely because the
    # caller's egress happens to be closed).
    for who in (prometheus, outside, services["jobs"], services["serving"], nats,
                (ours, template_labels(docs, "Deployment", "worker-cpu"))):
        assert not accepts(http, who, http_port), who
        assert not accepts(router, who, router_port), who
    # The HTTP gateway reaches its router only: no service directly (neither side allows it), no NATS,
    # database, S3 or internet.
    assert connects(docs, http, router, router_port)
    for service_name, service in services.items():
        assert not sends(http, service, GRPC_PORT), service_name
        assert not accepts(service, http, GRPC_PORT), service_name
    assert not sends(http, nats, 4222) and not accepts(nats, http, 4222)
    for port in (5432, 9000, 443, 80):
        assert not sends(http, anywhere, port), port
    # The router reaches every service's gRPC port, and nothing else of theirs or anyone's.
    for service_name, service in services.items():
        assert connects(docs, router, service, GRPC_PORT), service_name
        assert not sends(router, service, 9090), service_name
    assert not sends(router, services["serving"], 8082)
    assert not sends(router, nats, 4222) and not accepts(nats, router, 4222)
    assert not sends(router, http, http_port)
    for port in (5432, 9000, 443):
        assert not sends(router, anywhere, port), port
    # Nothing the gateway pair opened lets the router be bypassed: a service calling another outside the
    # service graph is still refused (metrics -> datasets), and DNS still resolves for both.
    assert not connects(docs, services["metrics"], services["datasets"], GRPC_PORT)
    dns = (ns("kube-system"), {"k8s-app": "kube-dns"})
    assert connects(docs, http, dns, 53) and connects(docs, router, dns, 53)


# -- exposing it -----------------------------------------------------------------------------------------

def ingress_backends(docs: tuple[Doc, ...], service: str) -> list[tuple[Doc, Doc, Doc]]:
    return [(ingress, rule, path) for ingress in of_kind(docs, "Ingress") for rule in ingress["spec"]["rules"]
            for path in rule["http"]["paths"] if path["backend"]["service"]["name"] == service]


@pytest.mark.parametrize("name", ["production", "multinode"])
def test_production_serves_the_console_over_tls_on_a_host_of_its_own(name: str) -> None:
    docs = overlay(name)
    ((ingress, rule, path),) = ingress_backends(docs, "http")
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"]["port"] == {"name": "http"}
    host = rule["host"]
    assert any(host in tls["hosts"] and tls["secretName"] for tls in ingress["spec"]["tls"])
    # The console's /v1/ (REST) must not share a host with the serving service's OpenAI-compatible /v1/.
    for other in of_kind(docs, "Ingress"):
        if other is not ingress:
            assert host not in {r.get("host") for r in other["spec"]["rules"]}, other["metadata"]["name"]
    # Streams and uploads pass through unbuffered and unbounded; the controller is the one the policies admit.
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    grpc_ingress = named(docs, "Ingress", "tuneforge")
    assert ingress["spec"]["ingressClassName"] == grpc_ingress["spec"]["ingressClassName"]
    # Two of each, so the PDBs let a drain through without an outage.
    for deployment in ("http", "gateway"):
        assert named(docs, "Deployment", deployment)["spec"]["replicas"] >= 2, deployment


def test_dev_exposes_the_console_by_port_forward_only() -> None:
    docs = overlay("dev")
    assert ingress_backends(docs, "http") == []
    assert "port-forward svc/http" in (ROOT / "deploy" / "k8s" / "overlays" / "dev" / "kustomization.yaml"
                                       ).read_text()


# -- compose and k8s alike -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_compose_and_k8s_run_the_gateway_pair_alike(name: str) -> None:
    services = compose()["services"]
    docs = overlay(name)
    env = env_of(container(docs, "http"))
    for var in HTTP_SETTINGS:
        assert str(services["http"]["environment"][var]) == env[var]["value"], var
    assert services["http"]["command"] == container(docs, "http")["command"]
    assert "/healthz" in " ".join(services["http"]["healthcheck"]["test"])
    assert services["gateway"]["image"] == container(docs, "gateway")["image"]


# -- the process itself ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rendered_env(docs: tuple[Doc, ...], c: Doc) -> dict[str, str]:
    """The container's environment as the kubelet would set it (ConfigMap keys resolved)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env = {}
    for var in c["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
    return env


def test_the_http_gateway_starts_with_its_k8s_environment_and_answers_its_probe(tmp_path: Path) -> None:
    """`python -m services.gateway` with the dev overlay's env (its port moved to a free one, the router
    not there: the gRPC channel connects lazily) listens and answers the probes' path with 200."""
    docs = overlay("dev")
    http = container(docs, "http")
    env = rendered_env(docs, http)
    port = free_port()
    env |= {"TUNEFORGE_HTTP_HOST": "127.0.0.1", "TUNEFORGE_HTTP_PORT": str(port), "HOME": str(tmp_path),
            "TUNEFORGE_READY_FILE": str(tmp_path / "ready")}
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    command = [sys.executable if part == "python" else part for part in http["command"]]
    proc = subprocess.Popen(command, cwd=ROOT, env=base | env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the HTTP gateway did not listen within 60 s"
            time.sleep(0.1)
        probe = http["readinessProbe"]["httpGet"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=5) as response:
            assert response.status == 200
        # A real route of the API does call the (absent) router: an error from the gateway, not a crash.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs", timeout=30)
            raise AssertionError("a call without a router answered")
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 503), exc.code
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
