"""Fixtures for the worker tests: a tiny model and chat data, built locally once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_chat_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", 160)
