"""deploy/observability/: the alert rules are well-formed Prometheus rule groups and the Grafana dashboard
parses, and both use only metric names the code exports (promtool is not available here: the checks are
structural). The manifests and compose file carry the metrics ports and scrape annotations."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, generate_latest

from services.kit.telemetry import FLEET_METRICS, SERVICE_METRICS, FleetCollector, FleetSnapshot
from tests.deploy.test_k8s_manifests import OVERLAYS, named, overlay
from trainer_worker.telemetry import WORKER_METRICS

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
EXPORTED = set(SERVICE_METRICS) | set(WORKER_METRICS)
NAME = re.compile(r"\btuneforge_[a-z_]+\b")


def names_in(expr: str) -> set[str]:
    return set(NAME.findall(expr))


def balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', "", expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    return loaded


def test_alert_rules_are_well_formed_groups(rules: dict[str, Any]) -> None:
    assert set(rules) == {"groups"}
    groups = {group["name"]: group for group in rules["groups"]}
    assert set(groups) == {"tuneforge-jobs", "tuneforge-rpc", "tuneforge-messages"}
    alerts = {rule["alert"]: rule for group in groups.values() for rule in group["rules"]}
    assert {"TuneForgeJobStuckRunning", "TuneForgeJobQueuedWithoutWorker", "TuneForgeNoWorkerForPool",
            "TuneForgeRPCErrorRate", "TuneForgeDeadLetters"} <= set(alerts)
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, name
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name)
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert balanced(rule["expr"]), name
        used = names_in(rule["expr"])
        assert used and used <= EXPORTED, (name, used - EXPORTED)


def test_the_alerts_watch_what_the_issue_asks(rules: dict[str, Any]) -> None:
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    assert 'state="RUNNING"' in alerts["TuneForgeJobStuckRunning"]
    assert {"tuneforge_work_queue_pending", "tuneforge_pool_workers"} <= names_in(
        alerts["TuneForgeNoWorkerForPool"])
    assert 'state="QUEUED"' in alerts["TuneForgeJobQueuedWithoutWorker"]
    assert "tuneforge_rpc_requests_total" in alerts["TuneForgeRPCErrorRate"]
    assert "tuneforge_dead_letters_total" in alerts["TuneForgeDeadLetters"]


def test_the_dashboard_parses_and_uses_only_exported_metrics() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert balanced(target["expr"]), target["expr"]
            used |= names_in(target["expr"])
    assert used <= EXPORTED, used - EXPORTED
    # Every part of the issue's list has a panel.
    assert {"tuneforge_rpc_requests_total", "tuneforge_rpc_duration_seconds_bucket", "tuneforge_jobs",
            "tuneforge_work_queue_pending", "tuneforge_workers",
            "tuneforge_worker_last_heartbeat_age_seconds",
            "tuneforge_metric_points_ingested_total", "tuneforge_worker_tokens_per_second",
            "tuneforge_worker_step_seconds", "tuneforge_worker_gpu_utilization_percent",
            "tuneforge_worker_gpu_memory_bytes"} <= used


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.call_soon_threadsafe(running.stop)
        thread.join(5)
        running.close()


def test_the_fleet_collector_exports_the_names_listed(loop: asyncio.AbstractEventLoop) -> None:
    async def snapshot() -> FleetSnapshot:
        return FleetSnapshot(jobs_by_state={"QUEUED": 1}, oldest_update_age_s={"QUEUED": 5.0},
                             queue={"any": (1, 0)}, pool_workers={"any": 0},
                             workers={("", "IDLE", "true"): 1}, heartbeat_age_s={("w1", ""): 2.0})

    registry = CollectorRegistry()
    registry.register(FleetCollector(snapshot, loop))
    text = generate_latest(registry).decode()
    exported = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
    assert exported == set(FLEET_METRICS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_pods_are_scraped_on_the_metrics_port(name: str) -> None:
    docs = overlay(name)
    config = named(docs, "ConfigMap", "tuneforge-config")["data"]
    port = int(config["TUNEFORGE_METRICS_PORT"])
    for service in ("identity", "datasets", "jobs", "estimation", "metrics", "serving"):
        template = named(docs, "Deployment", service)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == port
    worker = named(docs, "Deployment", "worker-cpu")["spec"]["template"]
    assert int(worker["metadata"]["annotations"]["prometheus.io/port"]) == int(
        config["TUNEFORGE_WORKER_METRICS_PORT"])


def test_compose_gives_each_service_its_own_metrics_port() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ports = {}
    for service, spec in compose["services"].items():
        command = spec.get("command") or []
        # The HTTP gateway (services.gateway) serves no /metrics: the services it calls count its calls.
        if (command[:2] == ["python", "-m"] and command[2].startswith("services.")
                and command[2] != "services.gateway"):
            ports[service] = int(spec["environment"]["TUNEFORGE_METRICS_PORT"])
    assert set(ports) >= {"identity", "datasets", "jobs", "estimation", "metrics"}
    assert len(set(ports.values())) == len(ports)
