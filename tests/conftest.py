"""Fixtures shared by every test level: real servers on free ports, never mocks of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kit.embedded import EmbeddedNats
from services.kit.settings import KitSettings

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on a free loopback port, private to the test."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
def kit_settings(tmp_path: Path, nats_url: str) -> KitSettings:
    """Settings for an in-test service process: SQLite and local storage under tmp_path, port 0."""
    return KitSettings(data_dir=tmp_path / "data", nats_url=nats_url, grpc_port=0, shutdown_grace_s=1.0,
                       storage_url=(tmp_path / "objects").resolve().as_uri())
