"""The JetStream consumer loops (services.kit.consumer): what is acked, terminated or redelivered."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from sqlalchemy.exc import DataError

from services.kit.consumer import MAX_NAK_DELAY_S, consume, nak_delay

STREAM, SUBJECT = "CONSUMER_TEST", "consumer-test.>"


def delivered(count: int | None) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(num_delivered=count))


def test_the_redelivery_delay_doubles_with_each_delivery_up_to_a_minute() -> None:
    assert [nak_delay(delivered(n), 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert nak_delay(delivered(7), 1.0) == MAX_NAK_DELAY_S == nak_delay(delivered(10_000), 1.0)
    assert nak_delay(delivered(None), 0.5) == 0.5
    assert nak_delay(delivered(3), 120.0) == 120.0  # a configured first delay above the cap is kept
    assert nak_delay(SimpleNamespace(), 1.0) == 1.0  # no JetStream metadata: the first delay


async def test_a_value_the_database_refuses_is_terminated_and_a_transient_failure_retried(
        nats_url: str) -> None:
    """A DataError fails the same way on every delivery: the message is terminated at its first, not naked
    forever; any other failure is redelivered until the handler takes it."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    attempts: dict[bytes, int] = {}
    handled: list[bytes] = []

    async def handler(msg: Msg) -> None:
        attempts[msg.data] = attempts.get(msg.data, 0) + 1
        if msg.data == b"too-long":
            raise DataError("INSERT", {}, Exception("value too long for type character varying(128)"))
        if msg.data == b"flaky" and attempts[msg.data] == 1:
            raise ConnectionError("the database is restarting")
        handled.append(msg.data)

    task = asyncio.create_task(consume(js, stream=STREAM, durable="consumer-test", subject=SUBJECT,
                                       handler=handler, batch=8, nak_delay_s=0.05))
    try:
        for data in (b"too-long", b"flaky", b"fine"):
            await js.publish("consumer-test.x", data)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            info = await js.consumer_info(STREAM, "consumer-test")
            if info.num_ack_pending == 0 and info.num_pending == 0 and len(handled) == 2:
                break
            assert asyncio.get_running_loop().time() < deadline, (attempts, handled)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a naked "too-long" would be back by now
        assert sorted(handled) == [b"fine", b"flaky"]
        assert attempts == {b"too-long": 1, b"flaky": 2, b"fine": 1}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await js.delete_stream(STREAM)
        await nc.drain()


@pytest.mark.parametrize("count", [0, -3])
def test_a_nonsense_delivery_count_gives_the_first_delay(count: int) -> None:
    assert nak_delay(delivered(count), 1.0) == 1.0
