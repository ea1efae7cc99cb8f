"""Fixtures for the generated clients' tests: one platform for the package (real nats-server, SQLite, a
worker training the tiny local model) and an admin API key to call it with, as a client in another
language would."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.platform.supervisor import Platform
from tests.auth import make_key
from tests.e2e.conftest import start_platform, tiny_assets  # noqa: F401 (tiny_assets is a fixture)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningPlatform:
    platform: Platform
    api_key: str
    model: Path
    data: Path


@pytest.fixture(scope="package")
def running_platform(tmp_path_factory: pytest.TempPathFactory,
                     tiny_assets: tuple[Path, Path]) -> Iterator[RunningPlatform]:  # noqa: F811
    model, data = tiny_assets
    platform = start_platform(tmp_path_factory.mktemp("clients-platform"), workers=1, model=model)
    try:
        key = make_key(platform.address, platform.data_dir, "clients")
        yield RunningPlatform(platform, key, model, data)
    finally:
        platform.stop()


def run_make(target: str) -> None:
    """`make TARGET` in the repository (the same set-up `make test` does), failing with its output."""
    done = subprocess.run(["make", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"
