"""The JetStream consumer loops (services.kit.consumer): what is acked, terminated or redelivered."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import nats
import psycopg
import pytest
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.exc import DataError, OperationalError

from services.kit.consumer import (
    MAX_NAK_DELAY_S,
    UNREACHABLE_NAK_DELAY_S,
    PermanentError,
    consume,
    consume_batches,
    nak_delay,
    refused_value,
    unreachable,
)

STREAM, SUBJECT = "CONSUMER_TEST", "consumer-test.>"


def delivered(count: int | None) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(num_delivered=count))


@contextlib.asynccontextmanager
async def consuming(nats_url: str, messages: Sequence[bytes],
                    loop: Any) -> AsyncIterator[JetStreamContext]:
    """A fresh stream holding `messages`, and `loop(js)` consuming it (a consumer loop, cancelled on exit;
    the stream is deleted)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    for data in messages:  # all pending before the consumer's first fetch
        await js.publish("consumer-test.x", data)
    task = asyncio.create_task(loop(js))
    try:
        yield js
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await js.delete_stream(STREAM)
        await nc.drain()


async def until(done: Any, what: Any) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while not await done():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def test_the_redelivery_delay_doubles_with_each_delivery_up_to_a_minute() -> None:
    assert [nak_delay(delivered(n), 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert nak_delay(delivered(7), 1.0) == MAX_NAK_DELAY_S == nak_delay(delivered(10_000), 1.0)
    assert nak_delay(delivered(None), 0.5) == 0.5
    assert nak_delay(delivered(3), 120.0) == 120.0  # a configured first delay above the cap is kept
    assert nak_delay(SimpleNamespace(), 1.0) == 1.0  # no JetStream metadata: the first delay


def test_while_a_server_is_unreachable_the_delay_stays_short() -> None:
    down = OperationalError("INSERT", {}, Exception("connection refused"))
    assert [nak_delay(delivered(n), 1.0, down) for n in (1, 2, 3, 4, 50)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert UNREACHABLE_NAK_DELAY_S == 5.0 < MAX_NAK_DELAY_S
    assert nak_delay(delivered(50), 1.0, ValueError("x")) == MAX_NAK_DELAY_S
    assert nak_delay(delivered(50), 8.0, down) == 8.0  # never under the configured first delay


@pytest.mark.parametrize("count", [0, -3])
def test_a_nonsense_delivery_count_gives_the_first_delay(count: int) -> None:
    assert nak_delay(delivered(count), 1.0) == 1.0


def test_what_says_the_database_is_unreachable() -> None:
    assert unreachable(OperationalError("INSERT", {}, Exception("connection refused")))
    assert unreachable(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert unreachable(psycopg.InterfaceError("the connection is closed"))
    assert unreachable(sqlite3.OperationalError("database is locked"))
    assert unreachable(ConnectionRefusedError()) and unreachable(TimeoutError())
    assert unreachable(ConnectionClosedError())
    assert not unreachable(DataError("INSERT", {}, Exception("value too long")))
    assert not unreachable(ValueError("a value nothing checked for"))
    assert not unreachable(KeyError("x"))


def test_what_says_the_database_refuses_a_value() -> None:
    assert refused_value(DataError("INSERT", {}, Exception("value too long for type character varying(128)")))
    assert refused_value(psycopg.errors.StringDataRightTruncation("value too long"))
    assert refused_value(psycopg.errors.NumericValueOutOfRange("integer out of range"))
    assert refused_value(sqlite3.DataError("string or blob too big"))
    assert not refused_value(OperationalError("INSERT", {}, Exception("connection refused")))
    assert not refused_value(ValueError("x"))


async def test_a_value_the_database_refuses_is_terminated_and_a_transient_failure_retried(
        nats_url: str) -> None:
    """A DataError fails the same way on every delivery: the message is terminated at its first, not naked
    forever; any other failure is redelivered until the handler takes it."""
    attempts: dict[bytes, int] = {}
    handled: list[bytes] = []

    async def handler(msg: Msg) -> None:
        attempts[msg.data] = attempts.get(msg.data, 0) + 1
        if msg.data == b"too-long":
            raise DataError("INSERT", {}, Exception("value too long for type character varying(128)"))
        if msg.data == b"flaky" and attempts[msg.data] == 1:
            raise ConnectionError("the database is restarting")
        handled.append(msg.data)

    def loop(js: JetStreamContext) -> Any:
        return consume(js, stream=STREAM, durable="consumer-test", subject=SUBJECT, handler=handler, batch=8,
                       nak_delay_s=0.05)

    async with consuming(nats_url, [b"too-long", b"flaky", b"fine"], loop) as js:
        async def settled() -> bool:
            try:
                info = await js.consumer_info(STREAM, "consumer-test")
            except NotFoundError:  # not made yet
                return False
            return info.num_ack_pending == 0 and info.num_pending == 0 and len(handled) == 2

        await until(settled, (attempts, handled))
        await asyncio.sleep(0.3)  # a naked "too-long" would be back by now
    assert sorted(handled) == [b"fine", b"flaky"]
    assert attempts == {b"too-long": 1, b"flaky": 2, b"fine": 1}


async def test_one_message_failing_its_batch_is_retried_alone_and_the_rest_is_handled_once(
        nats_url: str) -> None:
    """A batch whose handler fails for a reason other than an unreachable database is handed over again in
    halves: the message that fails is redelivered alone (with growing delays), or terminated when the
    database refused a value of it (DataError), and every other message of its batch is handled, and
    acked, at its first delivery."""
    batches: list[list[bytes]] = []
    redeliveries: list[bool] = []
    handled: list[bytes] = []
    deliveries: dict[bytes, int] = {}

    async def handler(msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        batch = [m.data for m in msgs]
        batches.append(batch)
        redeliveries.append(any(int(m.metadata.num_delivered or 0) > 1 for m in msgs))
        for m in msgs:
            deliveries[m.data] = max(deliveries.get(m.data, 0), int(m.metadata.num_delivered or 0))
        if b"poison" in batch:
            raise ValueError("a value the database refuses in a way nothing checked for")
        if b"refused" in batch:
            raise psycopg.errors.StringDataRightTruncation("value too long for type character varying(64)")
        handled.extend(batch)
        return {}

    def loop(js: JetStreamContext) -> Any:
        return consume_batches(js, stream=STREAM, durable="consumer-test-batches", subject=SUBJECT,
                               handler=handler, batch=100, fetch_wait_s=0.2, nak_delay_s=0.05)

    messages = [f"m{i:02d}".encode() for i in range(12)]
    messages.insert(7, b"poison")
    messages.insert(2, b"refused")  # a DataError: terminated once found alone, never redelivered
    async with consuming(nats_url, messages, loop):
        async def settled() -> bool:
            return len(handled) == 12 and deliveries.get(b"poison", 0) >= 3

        await until(settled, (batches, deliveries))
    assert batches[0] == messages  # one batch first
    assert sorted(handled) == sorted(m for m in messages if m not in (b"poison", b"refused"))  # each once
    assert all(deliveries[m] == 1 for m in messages if m != b"poison")
    assert [b"refused"] in batches
    assert all(batch == [b"poison"] for batch, again in zip(batches, redeliveries, strict=True) if again)
