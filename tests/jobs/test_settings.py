"""The jobs service's own setting travels from the environment to CreateJob's rules."""

from __future__ import annotations

import pytest

from services.jobs.settings import JobSettings
from tuneforge_core.settings import KitSettings


def test_user_reward_code_is_off_unless_the_operator_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    kit = KitSettings(grpc_port=5999)
    assert JobSettings.from_kit(kit).allow_user_reward_code is False
    monkeypatch.setenv("TUNEFORGE_ALLOW_USER_REWARD_CODE", "true")
    settings = JobSettings.from_kit(kit)
    assert settings.allow_user_reward_code is True
    assert settings.grpc_port == 5999  # the runner's explicit values are kept
    assert JobSettings.from_kit(settings) is settings
