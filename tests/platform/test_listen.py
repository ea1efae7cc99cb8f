"""One address, one server: a second server on a port in use fails with a clear message instead of sharing
the port (grpcio turns SO_REUSEPORT on by default), and `tuneforge up` listens where TUNEFORGE_GRPC_PORT
says."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.runtime import EXIT_ADDRESS_IN_USE, AddressInUse, serve
from tuneforge_core.settings import KitSettings

CLI = [sys.executable, "-m", "services.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    return {**clean, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


async def test_kit_server_refuses_a_port_in_use(kit_settings: KitSettings) -> None:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    first = asyncio.create_task(serve([], kit_settings, name="first", on_ready=ready.set_result, stop=stop))
    address = await asyncio.wait_for(ready, 30)
    try:
        port = int(address.rsplit(":", 1)[1])
        second = kit_settings.model_copy(update={"grpc_port": port})
        with pytest.raises(AddressInUse, match=f"^address 127.0.0.1:{port} is already in use$"):
            await serve([], second, name="second", stop=asyncio.Event())
        assert await asyncio.to_thread(serving, address)  # the first one is untouched
    finally:
        stop.set()
        await asyncio.wait_for(first, 30)


def test_service_process_exits_with_one_line_when_its_port_is_taken(tmp_path: Path) -> None:
    """The check the services process makes itself (`tuneforge up` checks before it starts anything, and
    `python -m services.<name>` only has this one)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.platform"], capture_output=True, text=True, timeout=120,
            env=env(TUNEFORGE_GRPC_PORT=str(port), TUNEFORGE_DATA_DIR=str(tmp_path),
                    TUNEFORGE_NATS_URL="nats://127.0.0.1:1"))  # never reached: the bind comes first
    assert result.returncode == EXIT_ADDRESS_IN_USE, result.stderr
    assert result.stderr.strip() == f"error: address 127.0.0.1:{port} is already in use"


@pytest.fixture
def first_up(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`tuneforge up` on a free port given only through TUNEFORGE_GRPC_PORT; yields its address."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "up", "--workers", "0", "--data-dir", str(tmp_path / "first"),
                             "--http-port", "0"],
                            env=env(TUNEFORGE_GRPC_PORT=str(port), COLUMNS="200"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "TuneForge is up on ADDRESS (...)", or EOF if it failed
        if f"TuneForge is up on 127.0.0.1:{port} " not in line:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"tuneforge up did not start on port {port}: {line}{err}")
        yield f"127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_second_up_on_the_same_port_fails_and_up_reads_the_port_setting(
        first_up: tuple[str, subprocess.Popen[str]], tmp_path: Path) -> None:
    address, first = first_up
    port = address.rsplit(":", 1)[1]
    assert serving(address)
    for args, extra in ((["--port", port], {}), ([], {"TUNEFORGE_GRPC_PORT": port})):
        started = time.monotonic()
        second = subprocess.run([*CLI, "up", "--workers", "0", "--data-dir", str(tmp_path / "second"),
                                 "--http-port", "0", *args],
                                env=env(COLUMNS="200", **extra), capture_output=True, text=True, timeout=120)
        assert second.returncode != 0, second.stdout
        assert f"address {address} is already in use" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        assert "TuneForge is up" not in second.stdout
        assert time.monotonic() - started < 30
    assert first.poll() is None and serving(address)  # the first one is untouched
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0


def test_up_names_the_port_that_is_taken_when_it_is_not_the_grpc_one(tmp_path: Path) -> None:
    """The services process serves more than gRPC (its Prometheus endpoint here): a taken one is named with
    its setting, not reported as the gRPC port."""
    port, http_port = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "up", "--workers", "0", "--data-dir", str(tmp_path / "up"), "--port", str(port),
             "--http-port", str(http_port)], capture_output=True, text=True, timeout=120,
            env=env(COLUMNS="200", TUNEFORGE_METRICS_PORT=str(metrics_port)))
    assert result.returncode != 0, result.stdout
    said = " ".join(result.stderr.split())
    assert f"address 127.0.0.1:{metrics_port} is already in use (TUNEFORGE_METRICS_PORT" in said, said
    assert f"127.0.0.1:{port} is already in use" not in said
    assert "Traceback" not in result.stderr + result.stdout
