"""DatasetSettings: the upload limit from the environment, on top of whatever kit settings the runner made."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.datasets.settings import GIB, DatasetSettings
from tuneforge_core.settings import KitSettings


def test_from_kit_keeps_kit_values_and_reads_the_limit(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("TUNEFORGE_MAX_UPLOAD_BYTES", "12345")
    monkeypatch.setenv("TUNEFORGE_GRPC_PORT", "7000")
    kit = KitSettings(data_dir=tmp_path, grpc_port=0, nats_url="nats://x:1")
    settings = DatasetSettings.from_kit(kit)
    assert (settings.max_upload_bytes, settings.grpc_port, settings.data_dir) == (12345, 0, tmp_path)
    assert settings.nats_url == "nats://x:1"
    assert DatasetSettings.from_kit(settings) is settings


def test_default_limit_is_2_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEFORGE_MAX_UPLOAD_BYTES", raising=False)
    assert DatasetSettings().max_upload_bytes == 2 * GIB
