"""The gateway as a platform process: its port is checked before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.platform.supervisor import Platform, PlatformConfig, PlatformStartError


def test_a_taken_http_port_fails_the_start_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        platform = Platform(PlatformConfig(data_dir=tmp_path, grpc_port=0, http_port=port, workers=0))
        with pytest.raises(PlatformStartError, match=rf"127\.0\.0\.1:{port} is already in use.*--http-port"):
            platform.start()
    assert platform.nats is None and platform.services is None and platform.gateway is None


def test_the_http_port_follows_the_grpc_port_unless_given(tmp_path: Path) -> None:
    assert Platform(PlatformConfig(data_dir=tmp_path)).http_port == 8080
    assert Platform(PlatformConfig(data_dir=tmp_path, grpc_port=0)).http_port == 0
    assert Platform(PlatformConfig(data_dir=tmp_path, grpc_port=0, http_port=9090)).http_port == 9090
