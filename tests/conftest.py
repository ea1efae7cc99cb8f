"""Fixtures shared by every test level: real servers on free ports, never mocks of them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from services.kit.embedded import EmbeddedNats
from tests.auth import SERVICE_TOKEN
from tuneforge_core.settings import KitSettings

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
                       storage_url=(tmp_path / "objects").resolve().as_uri(), service_token=SERVICE_TOKEN)


POSTGRES_URL = os.environ.get("TUNEFORGE_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections use a fresh schema on the test PostgreSQL (search_path), dropped with
    everything in it afterwards; skips with the reason where no PostgreSQL is reachable."""
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL} ({type(exc).__name__}); "
                    "set TUNEFORGE_TEST_POSTGRES_URL to run this test")
    schema = f"tf_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()
