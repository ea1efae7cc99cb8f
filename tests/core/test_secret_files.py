"""Secret settings read from files (TUNEFORGE_<NAME>_FILE), as compose and Kubernetes secrets mount them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.datasets.settings import DatasetSettings
from tuneforge_core.settings import KitSettings


def test_a_secret_comes_from_its_file_and_the_variable_itself_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "db_url"
    secret.write_text("postgresql+psycopg://tf:s3cret@db/tuneforge\n")
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL_FILE", str(secret))
    assert KitSettings().database_url == "postgresql+psycopg://tf:s3cret@db/tuneforge"  # newline dropped
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", "sqlite:///x.db")
    assert KitSettings().database_url == "sqlite:///x.db"


def test_a_setting_of_another_class_is_read_where_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "credentials_key"
    key.write_text("k" * 44)
    monkeypatch.setenv("TUNEFORGE_CREDENTIALS_KEY_FILE", str(key))
    assert DatasetSettings().credentials_key.get_secret_value() == "k" * 44
    assert not hasattr(KitSettings(), "credentials_key")


def test_an_unreadable_secret_file_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_SERVICE_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="TUNEFORGE_SERVICE_TOKEN_FILE: cannot read"):
        KitSettings()
