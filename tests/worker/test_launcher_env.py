"""The training process runs user models and data: it inherits none of the platform's credentials."""

from __future__ import annotations

import pytest

from trainer_worker.launcher import training_env

SECRETS = {
    "TUNEFORGE_DATABASE_URL": "postgresql://tf:hunter2@db/tf",
    "TUNEFORGE_NATS_URL": "nats://127.0.0.1:4222",
    "TUNEFORGE_CREDENTIALS_KEY": "k",
    "TUNEFORGE_PAGE_TOKEN_KEY": "k",
    "AWS_SECRET_ACCESS_KEY": "s",
    "AWS_ACCESS_KEY_ID": "a",
    "AWS_SESSION_TOKEN": "t",
    "GOOGLE_APPLICATION_CREDENTIALS": "/etc/gcp.json",
    "PGPASSWORD": "p",
    "MY_SERVICE_PASSWORD": "p",
    "SOME_API_KEY": "x",
}
KEPT = {
    "PATH": "/usr/bin",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "PET_NNODES": "2",
    "TORCH_EXTENSIONS_DIR": "/tmp/ext",
    "TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE": "true",
}


def test_platform_credentials_stay_with_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(name, value)
    env = training_env({"TORCH_EXTENSIONS_DIR": "/work/ext"})
    assert not set(SECRETS) & set(env)
    assert {k: env[k] for k in KEPT if k != "TORCH_EXTENSIONS_DIR"} == {
        k: v for k, v in KEPT.items() if k != "TORCH_EXTENSIONS_DIR"
    }
    assert env["TORCH_EXTENSIONS_DIR"] == "/work/ext" and env["PYTHONUNBUFFERED"] == "1"
