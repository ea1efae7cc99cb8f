"""deploy/k8s NATS: the nats.conf files the StatefulSet mounts are valid for the real nats-server, hold the
same worker permissions as `tuneforge up`'s embedded server, and the production one forms a 3-node
JetStream cluster on which the services' streams get 3 replicas (TUNEFORGE_NATS_STREAM_REPLICAS) and
survive the loss of a node. The cluster runs here on loopback: the same file, with its ports, folders and
route addresses rewritten."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import APIError
from pydantic import ValidationError

from services.kit.embedded import nats_server_binary
from tests.seaweed import free_port
from tuneforge_core import subjects
from tuneforge_core.nats import connect, ensure_streams, publish, stream_configs, worker_permissions

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
CONFIGS = {"production": K8S / "base" / "nats" / "nats.conf", "dev": K8S / "overlays" / "dev" / "nats.conf"}
# A job's JobChanged subject on TF_EVENTS.
SUBJECT = subjects.job_events("job_k8s")
PASSWORDS = {"NATS_SERVICES_PASSWORD": "services-secret", "NATS_WORKER_PASSWORD": "worker-secret"}


def server_env(pod_name: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "POD_NAME": pod_name, **PASSWORDS}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_config_is_valid_for_nats_server(name: str) -> None:
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(CONFIGS[name])], env=server_env("nats-0"),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    # The passwords come from the environment (the Secret tuneforge-nats): without them it is refused.
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(CONFIGS[name])],
                         env={"PATH": os.environ.get("PATH", ""), "POD_NAME": "nats-0"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "NATS_SERVICES_PASSWORD" in out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_worker_user_has_exactly_the_embedded_servers_permissions(name: str) -> None:
    text = CONFIGS[name].read_text()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.M)
    start = text.index("permissions:") + len("permissions:")
    permissions, _ = json.JSONDecoder().raw_decode(text[start:].lstrip())
    assert permissions == worker_permissions()


@dataclass
class Node:
    name: str
    client_port: int
    http_port: int
    route_port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


def loopback_config(text: str, node: Node, nodes: list[Node]) -> str:
    """The production nats.conf with this node's loopback ports and folders, routes to the others."""
    replacements = [
        (r"^port: 4222$", f"host: 127.0.0.1\nport: {node.client_port}"),
        (r"^http_port: 8222$", f"http: 127.0.0.1:{node.http_port}"),
        (r"^pid_file: .*$", f"pid_file: {node.folder / 'nats.pid'}"),
        (r"^  store_dir: /data/jetstream$", f"  store_dir: {node.folder / 'jetstream'}"),
        (r"^  max_file_store: .*$", "  max_file_store: 1GB"),
        (r"^  port: 6222$", f"  listen: 127.0.0.1:{node.route_port}"),
    ]
    replacements += [(rf"nats://{re.escape(n.name)}\.nats-headless:6222", f"nats://127.0.0.1:{n.route_port}")
                     for n in nodes]
    for pattern, value in replacements:
        text, count = re.subn(pattern, value, text, flags=re.M)
        assert count == 1, f"{pattern} not found once in nats.conf"
    return text


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Node]]:
    nodes = [Node(f"nats-{i}", free_port(), free_port(), free_port(), tmp_path / f"nats-{i}")
             for i in range(3)]
    text = CONFIGS["production"].read_text()
    try:
        for node in nodes:
            node.folder.mkdir()
            conf = node.folder / "nats.conf"
            conf.write_text(loopback_config(text, node, nodes))
            log = open(node.folder / "server.log", "ab")
            node.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], env=server_env(node.name),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        deadline = time.monotonic() + 60
        for node in nodes:
            while not healthy(node):
                server_log = (node.folder / "server.log").read_text()
                assert node.proc is not None and node.proc.poll() is None, server_log
                assert time.monotonic() < deadline, server_log
                time.sleep(0.2)
        yield nodes
    finally:
        for node in nodes:
            stop(node)


def healthy(node: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stop(node: Node) -> None:
    if node.proc is None or node.proc.poll() is not None:
        return
    node.proc.send_signal(signal.SIGTERM)
    try:
        node.proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()


async def connect_as(user: str, node: Node) -> NATS:
    return await connect(node.url, user, user=user, password=PASSWORDS[f"NATS_{user.upper()}_PASSWORD"])


async def until(what: str, attempt: object, timeout_s: float = 60.0) -> object:
    """Calls the coroutine function `attempt` until it returns without a NATS API error (the cluster elects
    its JetStream meta leader and stream leaders on its own time)."""
    assert callable(attempt)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await attempt()
        except (APIError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc}") from exc
            await asyncio.sleep(0.5)


async def test_streams_get_three_replicas_on_the_cluster_and_survive_a_lost_node(
        cluster: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    # What every service process of the production overlay has (config-patch.yaml).
    monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "3")
    services = await connect_as("services", cluster[0])
    try:
        js = services.jetstream()
        await until("ensure_streams", lambda: ensure_streams(js))
        for config in stream_configs():
            assert config.name is not None
            info = await js.stream_info(config.name)
            assert info.config.num_replicas == 3, config.name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, config.name
        await publish(js, SUBJECT, b"stored on three nodes", "evt-k8s-1")
    finally:
        await services.close()

    # A worker (narrow permissions, no stream updates) with or without the setting only reads the streams.
    for replicas in ("0", "3"):
        monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", replicas)
        worker = await connect_as("worker", cluster[1])
        try:
            await ensure_streams(worker.jetstream())
        finally:
            await worker.close()

    # Lose a node: the acknowledged event is still there, and new events are still taken.
    assert cluster[0].proc is not None
    os.killpg(cluster[0].proc.pid, signal.SIGKILL)
    cluster[0].proc.wait()
    services = await connect_as("services", cluster[2])
    try:
        js = services.jetstream()
        stored = await until("read after a lost node",
                             lambda: js.get_last_msg(subjects.STREAM_EVENTS, SUBJECT))
        assert getattr(stored, "data", None) == b"stored on three nodes"
        await publish(js, SUBJECT, b"after the loss", "evt-k8s-2")
        info = await js.stream_info(subjects.STREAM_EVENTS)
        assert info.state.messages == 2
    finally:
        await services.close()


async def test_the_stream_replicas_setting_on_a_single_server(nats_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset (0): streams as the server makes them (1 copy) and existing ones left alone; a value the
    server cannot meet is refused by NATS, a value out of range by the setting itself."""
    nc = await connect(nats_url, "services")
    try:
        js = nc.jetstream()
        monkeypatch.delenv("TUNEFORGE_NATS_STREAM_REPLICAS", raising=False)
        await ensure_streams(js)
        monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "1")
        await ensure_streams(js)
        for config in stream_configs():
            assert config.name is not None
            assert (await js.stream_info(config.name)).config.num_replicas == 1
        monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "3")
        with pytest.raises(APIError):  # one server cannot hold 3 copies
            await ensure_streams(js)
        monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "9")
        with pytest.raises(ValidationError, match="stream_replicas"):
            await ensure_streams(js)
    finally:
        await nc.close()
