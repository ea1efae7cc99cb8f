"""Secrets from files: TUNEFORGE_<NAME>_FILE for the settings that carry one (tuneforge_core.settings), what
docker-compose.yml and Kubernetes secret volumes use instead of values in the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.datasets.settings import DatasetSettings
from trainer_worker.agent import AgentSettings
from tuneforge_core.settings import SECRET_FILE_SETTINGS, KitSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_FILE_SETTINGS:
        monkeypatch.delenv(f"TUNEFORGE_{name.upper()}", raising=False)
        monkeypatch.delenv(f"TUNEFORGE_{name.upper()}_FILE", raising=False)


def test_each_secret_setting_reads_its_file_without_the_trailing_newline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_FILE_SETTINGS:
        (tmp_path / name).write_text(f"value of {name}\n")
        monkeypatch.setenv(f"TUNEFORGE_{name.upper()}_FILE", str(tmp_path / name))
    for cls in (KitSettings, AgentSettings, DatasetSettings):
        settings = cls()
        for name in SECRET_FILE_SETTINGS:
            if name in cls.model_fields:
                value = getattr(settings, name)
                value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
                assert value == f"value of {name}", (cls.__name__, name)
    assert "credentials_key" not in KitSettings.model_fields  # the datasets service's own
    assert "value of nats_password" not in repr(KitSettings())
    assert "value of credentials_key" not in repr(DatasetSettings())


def test_the_variable_itself_and_explicit_values_win_over_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file")
    monkeypatch.setenv("TUNEFORGE_SERVICE_TOKEN_FILE", str(tmp_path / "token"))
    assert KitSettings().service_token == "from-file"
    assert KitSettings(service_token="explicit").service_token == "explicit"
    monkeypatch.setenv("TUNEFORGE_SERVICE_TOKEN", "from-env")
    assert KitSettings().service_token == "from-env"
    # The platform runner's copy of the kit settings keeps what it was given.
    assert DatasetSettings.from_kit(KitSettings(service_token="kit")).service_token == "kit"


def test_a_file_that_cannot_be_read_names_the_variable_and_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-file"
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL_FILE", str(missing))
    with pytest.raises(ValueError, match=rf"TUNEFORGE_DATABASE_URL_FILE: cannot read '{missing}'"):
        KitSettings()


def test_settings_that_are_not_secrets_have_no_file_variant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "level").write_text("DEBUG")
    monkeypatch.setenv("TUNEFORGE_LOG_LEVEL_FILE", str(tmp_path / "level"))
    assert KitSettings().log_level == "INFO"
    # The settings whose own names end in _file are paths, read as given.
    monkeypatch.setenv("TUNEFORGE_TLS_CERT_FILE", "/etc/tls/cert.pem")
    assert KitSettings().tls_cert_file == "/etc/tls/cert.pem"
