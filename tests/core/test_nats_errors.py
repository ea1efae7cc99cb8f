"""A NATS server that cannot be reached: the error names the URL (never its password) and is logged once,
then every REPEAT_LOG_S with a count, not on every reconnect attempt (twice a second)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from tuneforge_core import nats as tf_nats


async def test_an_unreachable_server_is_said_once_naming_the_url_without_its_password(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf_nats, "REPEAT_LOG_S", 2.0)
    caplog.set_level(logging.WARNING, logger="tuneforge_core.nats")
    connecting = asyncio.create_task(tf_nats.connect("nats://worker:s3cret@127.0.0.1:1", "test"))
    await asyncio.sleep(3.2)  # about 6 attempts
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    said = [r.getMessage() for r in caplog.records if "nats error" in r.getMessage()]
    assert 1 <= len(said) <= 2, said
    assert all("nats://worker:***@127.0.0.1:1" in line and "s3cret" not in line for line in said), said
    if len(said) == 2:
        assert "more times in the last" in said[1]
