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

from services.kit import consumer
from services.kit.consumer import (
    DEAD_CAUSE,
    DEAD_CONSUMER,
    DEAD_DELIVERIES,
    DEAD_HEADERS_DROPPED,
    DEAD_REASON,
    DEAD_SEQUENCE,
    DEAD_SUBJECT,
    DEAD_TRUNCATED,
    MAX_NAK_DELAY_S,
    UNREACHABLE_NAK_DELAY_S,
    PermanentError,
    consume,
    consume_batches,
    nak_delay,
    refused_value,
    unreachable,
    unsettled,
)
from tuneforge_core import subjects
from tuneforge_core.nats import stream_configs

STREAM, SUBJECT = "CONSUMER_TEST", "consumer-test.>"


def delivered(count: int | None) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(num_delivered=count))


DEAD_LETTERS_CONFIG = next(c for c in stream_configs() if c.name == subjects.STREAM_DEAD_LETTERS)


@contextlib.asynccontextmanager
async def consuming(nats_url: str, messages: Sequence[bytes], loop: Any, *, dead_letters: bool = True,
                    named: bool = True) -> AsyncIterator[JetStreamContext]:
    """A fresh stream holding `messages`, and `loop(js)` consuming it (a consumer loop, cancelled on exit;
    the stream is deleted). With `dead_letters`, the platform's dead-letter stream exists too; `named`:
    each message carries its data in a header too."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    if dead_letters:
        await js.add_stream(DEAD_LETTERS_CONFIG)
    for data in messages:  # all pending before the consumer's first fetch
        await js.publish("consumer-test.x", data, headers={"Job": data.decode()} if named else None)
    task = asyncio.create_task(loop(js))
    try:
        yield js
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await js.delete_stream(STREAM)
        await nc.drain()


@contextlib.asynccontextmanager
async def fresh_stream(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """An empty stream on SUBJECT for the test's own consumers; deleted afterwards."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    try:
        yield js
    finally:
        await js.delete_stream(STREAM)
        await nc.drain()


async def kept(js: JetStreamContext) -> list[Any]:
    """What the dead-letter stream holds, oldest first."""
    try:
        state = (await js.stream_info(subjects.STREAM_DEAD_LETTERS)).state
    except NotFoundError:
        return []
    return [await js.get_msg(subjects.STREAM_DEAD_LETTERS, seq)
            for seq in range(state.first_seq, state.last_seq + 1) if state.messages]


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
        dead = await kept(js)
    assert sorted(handled) == [b"fine", b"flaky"]
    assert attempts == {b"too-long": 1, b"flaky": 2, b"fine": 1}
    # Kept as it came, the original headers with it, saying from where, why and after how many deliveries.
    assert [m.data for m in dead] == [b"too-long"]
    letter = dead[0]
    assert letter.subject == f"tuneforge.dead.{STREAM}.consumer-test"
    assert letter.headers["Job"] == "too-long"
    assert letter.headers[DEAD_SUBJECT] == "consumer-test.x"
    assert letter.headers[DEAD_CONSUMER] == "consumer-test"
    assert letter.headers[DEAD_CAUSE] == "refused_value"
    assert "value too long for type character varying(128)" in letter.headers[DEAD_REASON]
    assert letter.headers[DEAD_DELIVERIES] == "1"
    assert letter.headers[DEAD_SEQUENCE] == "1"


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
    async with consuming(nats_url, messages, loop) as js:
        async def settled() -> bool:
            return len(handled) == 12 and deliveries.get(b"poison", 0) >= 3

        await until(settled, (batches, deliveries))
        dead = await kept(js)
    assert [(m.data, m.headers[DEAD_CAUSE]) for m in dead] == [(b"refused", "refused_value")]
    assert batches[0] == messages  # one batch first
    assert sorted(handled) == sorted(m for m in messages if m not in (b"poison", b"refused"))  # each once
    assert all(deliveries[m] == 1 for m in messages if m != b"poison")
    assert [b"refused"] in batches
    assert all(batch == [b"poison"] for batch, again in zip(batches, redeliveries, strict=True) if again)


@pytest.mark.parametrize("batched", [False, True], ids=["consume", "consume_batches"])
async def test_a_message_failing_every_delivery_is_kept_as_a_dead_letter_after_its_last(
        nats_url: str, batched: bool) -> None:
    """A message that fails for a reason nothing names (not a server out of reach) is delivered `dead_after`
    times, then kept in TF_DEAD_LETTERS and never delivered again; one the handler refuses outright is kept
    at its first delivery; the others are handled once."""
    deliveries: dict[bytes, int] = {}
    handled: list[bytes] = []

    def delivered(msg: Msg) -> None:
        deliveries[msg.data] = max(deliveries.get(msg.data, 0), int(msg.metadata.num_delivered or 0))

    async def one(msg: Msg) -> None:
        delivered(msg)
        if msg.data == b"poison":
            raise ValueError("a value nothing checked for")
        if msg.data == b"undecodable":
            raise PermanentError("undecodable Thing on consumer-test.x")
        handled.append(msg.data)

    async def many(msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        """All or nothing, as one transaction: a poison message fails the batch it is in."""
        for msg in msgs:
            delivered(msg)
        if any(msg.data == b"poison" for msg in msgs):
            raise ValueError("a value nothing checked for")
        handled.extend(msg.data for msg in msgs if msg.data != b"undecodable")
        return {i: PermanentError("undecodable Thing on consumer-test.x")
                for i, msg in enumerate(msgs) if msg.data == b"undecodable"}

    def loop(js: JetStreamContext) -> Any:
        if batched:
            return consume_batches(js, stream=STREAM, durable="consumer-dead", subject=SUBJECT, handler=many,
                                   batch=10, fetch_wait_s=0.2, nak_delay_s=0.02, dead_after=3)
        return consume(js, stream=STREAM, durable="consumer-dead", subject=SUBJECT, handler=one, batch=10,
                       nak_delay_s=0.02, dead_after=3)

    async with consuming(nats_url, [b"a", b"poison", b"undecodable", b"b"], loop) as js:
        async def settled() -> bool:
            return len(await kept(js)) == 2

        await until(settled, (deliveries, handled))
        await asyncio.sleep(0.5)  # a fourth delivery of "poison" would be here by now
        dead = await kept(js)
    assert deliveries[b"poison"] == 3
    assert deliveries[b"undecodable"] == 1
    assert sorted(handled) == [b"a", b"b"]
    letters = {m.data: m.headers for m in dead}
    assert letters[b"undecodable"][DEAD_CAUSE] == "permanent"
    assert letters[b"undecodable"][DEAD_REASON] == "undecodable Thing on consumer-test.x"
    assert letters[b"poison"][DEAD_CAUSE] == "deliveries"
    assert letters[b"poison"][DEAD_DELIVERIES] == "3"
    assert letters[b"poison"][DEAD_REASON] == ("failed 3 deliveries, the last with ValueError: a value "
                                               "nothing checked for")
    assert {m.subject for m in dead} == {f"tuneforge.dead.{STREAM}.consumer-dead"}


async def test_an_unreachable_server_is_waited_out_past_the_last_delivery(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that fails because a server is out of reach is not given up on, however many deliveries
    it takes."""
    deliveries: list[int] = []

    async def handler(msg: Msg) -> None:
        deliveries.append(int(msg.metadata.num_delivered or 0))
        if len(deliveries) < 5:
            raise OperationalError("INSERT", {}, Exception("connection refused"))

    def loop(js: JetStreamContext) -> Any:
        return consume(js, stream=STREAM, durable="consumer-outage", subject=SUBJECT, handler=handler,
                       nak_delay_s=0.02, dead_after=2)

    monkeypatch.setattr(consumer, "UNREACHABLE_NAK_DELAY_S", 0.05)
    async with consuming(nats_url, [b"waits"], loop) as js:
        async def handled() -> bool:
            return len(deliveries) == 5

        await until(handled, deliveries)
        dead = await kept(js)
    assert deliveries == [1, 2, 3, 4, 5]
    assert dead == []


async def test_a_message_that_cannot_be_kept_is_redelivered_not_dropped(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nowhere to keep it (the dead-letter stream missing, NATS failing), a message given up on is
    delivered again; once it can be kept, it is, and its deliveries end."""
    monkeypatch.setattr(consumer, "UNREACHABLE_NAK_DELAY_S", 0.05)
    deliveries: list[int] = []

    async def handler(msg: Msg) -> None:
        deliveries.append(int(msg.metadata.num_delivered or 0))
        raise PermanentError("undecodable Thing on consumer-test.x")

    def loop(js: JetStreamContext) -> Any:
        return consume(js, stream=STREAM, durable="consumer-nowhere", subject=SUBJECT, handler=handler,
                       nak_delay_s=0.02)

    async with consuming(nats_url, [b"lost?"], loop, dead_letters=False) as js:
        async def redelivered() -> bool:
            return len(deliveries) >= 3

        await until(redelivered, deliveries)
        await js.add_stream(DEAD_LETTERS_CONFIG)

        async def kept_once() -> bool:
            return len(await kept(js)) == 1

        await until(kept_once, deliveries)
        settled = len(deliveries)
        await asyncio.sleep(0.5)
        dead = await kept(js)
    assert len(deliveries) == settled  # terminated once kept
    assert [m.data for m in dead] == [b"lost?"]
    assert dead[0].headers[DEAD_DELIVERIES] == str(deliveries[-1])


async def test_a_message_too_large_to_keep_whole_is_kept_cut_to_fit(nats_url: str) -> None:
    """A message of the server's whole max_payload cannot be kept whole with the dead letter's headers
    beside it (the server would refuse it and close the connection, and the message would come back for
    ever), nor one whose headers leave no room for them below JetStream's 64 KiB: each is kept cut to fit,
    saying so and how large it was, and its deliveries end."""
    nc = await nats.connect(nats_url)
    limit = nc.max_payload
    await nc.close()
    big = b"x" * (limit - 200)
    deliveries: list[int] = []

    async def handler(msg: Msg) -> None:
        deliveries.append(int(msg.metadata.num_delivered or 0))
        raise PermanentError("undecodable Thing on consumer-test.x")

    def loop(js: JetStreamContext) -> Any:
        return consume(js, stream=STREAM, durable="consumer-big", subject=SUBJECT, handler=handler,
                       nak_delay_s=0.02)

    async with consuming(nats_url, [big, b"small"], loop, named=False) as js:
        # Headers just under JetStream's 64 KiB: stored, but with no room for the dead letter's own.
        await js.publish("consumer-test.x", b"headed", headers={"Big": "h" * (64 * 1024 - 12 - 7 - 100)})

        async def kept_all() -> bool:
            return len(await kept(js)) == 3

        await until(kept_all, deliveries)
        await asyncio.sleep(0.5)
        dead = {m.data[:6]: m for m in await kept(js)}
    assert deliveries == [1, 1, 1], "each delivered once, then kept"
    cut = dead[b"xxxxxx"]
    assert big.startswith(cut.data) and limit - 4096 < len(cut.data) < len(big), len(cut.data)
    assert cut.headers[DEAD_TRUNCATED] == str(len(big)) and cut.headers[DEAD_CAUSE] == "permanent"
    assert DEAD_HEADERS_DROPPED not in cut.headers
    headed = dead[b"headed"]
    assert headed.data == b"headed" and "Big" not in headed.headers and DEAD_TRUNCATED not in headed.headers
    assert headed.headers[DEAD_HEADERS_DROPPED] == str(64 * 1024 - 100)
    assert headed.headers[DEAD_SEQUENCE] == "3"
    assert not {DEAD_TRUNCATED, DEAD_HEADERS_DROPPED} & set(dead[b"small"].headers)


@pytest.mark.parametrize("batched", [False, True], ids=["consume", "consume_batches"])
async def test_a_message_handled_past_the_ack_wait_is_not_handed_to_another_replica(
        nats_url: str, batched: bool) -> None:
    """Two replicas of a service pull from one durable consumer; a message whose handling takes longer than
    the ack wait stays with the replica handling it (in-progress acks), and is handled once."""
    handled: list[tuple[str, bytes, int]] = []

    def handler_of(replica: str) -> Any:
        async def one(msg: Msg) -> None:
            handled.append((replica, msg.data, int(msg.metadata.num_delivered or 0)))
            if msg.data == b"slow":
                await asyncio.sleep(2.5)  # over twice the ack wait

        async def many(msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
            for msg in msgs:
                await one(msg)
            return {}

        return many if batched else one

    def replica(js: JetStreamContext, name: str) -> Any:
        if batched:
            return consume_batches(js, stream=STREAM, durable="consumer-slow", subject=SUBJECT,
                                   handler=handler_of(name), batch=10, fetch_wait_s=0.2, ack_wait_s=1.0)
        return consume(js, stream=STREAM, durable="consumer-slow", subject=SUBJECT, handler=handler_of(name),
                       batch=10, ack_wait_s=1.0)

    async with consuming(nats_url, [b"slow", b"next"], lambda js: replica(js, "a")) as js:
        async def fetched() -> bool:  # replica a has the fetch
            return bool(handled)

        await until(fetched, handled)
        other = asyncio.create_task(replica(js, "b"))
        try:
            await asyncio.sleep(3.5)
            info = await js.consumer_info(STREAM, "consumer-slow")
        finally:
            other.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await other
    assert sorted(data for _, data, _ in handled) == [b"next", b"slow"], handled
    assert all(delivery == 1 for *_, delivery in handled), handled
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0


async def test_once_told_to_stop_a_batch_consumer_fetches_no_more_and_settles_what_it_holds(
        nats_url: str) -> None:
    """`until`: the batch in hand is handled to its end and acked, nothing more is fetched, and the loop
    returns by itself (a replica handing its work over to another, services.metrics.ingest)."""
    enough = asyncio.Event()
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        started.set()
        await release.wait()
        handled.extend(m.data for m in msgs)
        return {}

    async with fresh_stream(nats_url) as js:
        for i in range(3):
            await js.publish("consumer-test.x", f"a{i}".encode())
        # Two batches in flight: the loop goes on fetching while the first is handled.
        task = asyncio.create_task(consume_batches(
            js, stream=STREAM, durable="consumer-test-until", subject=SUBJECT, handler=handler, batch=3,
            fetch_wait_s=0.2, in_flight=2, until=enough))
        await started.wait()
        enough.set()
        await asyncio.sleep(0.5)  # a fetch in flight then has ended
        for i in range(3):
            await js.publish("consumer-test.x", f"b{i}".encode())
        await asyncio.sleep(0.5)
        assert not task.done()  # the batch in hand is still being handled
        release.set()
        await asyncio.wait_for(task, 10)
        assert handled == [b"a0", b"a1", b"a2"]

        async def acked() -> bool:
            info = await js.consumer_info(STREAM, "consumer-test-until")
            return info.num_ack_pending == 0

        await until(acked, "the batch in hand is acked")
        info = await js.consumer_info(STREAM, "consumer-test-until")
        assert info.num_pending == 3  # the rest left for another


async def test_what_a_consumer_handed_out_and_no_one_acked_is_read_back_in_order(nats_url: str) -> None:
    """`unsettled`: from the first message not acked to the last handed out, in stream order, on the
    consumer's subject only; what was acked before stays out, and a consumer not made yet has none."""
    async with fresh_stream(nats_url) as js:
        filtered = "consumer-test.x.*"
        assert await unsettled(js, STREAM, "consumer-test-unsettled", filtered) == []
        for i in range(8):
            await js.publish(f"consumer-test.x.{i}", f"m{i}".encode())
            await js.publish("consumer-test.y", f"other{i}".encode())  # not the consumer's
        sub = await js.pull_subscribe(filtered, durable="consumer-test-unsettled", stream=STREAM)
        assert await unsettled(js, STREAM, "consumer-test-unsettled", filtered) == []  # nothing handed out
        msgs = await sub.fetch(6, timeout=5)
        assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(6)]
        for m in (msgs[0], msgs[1], msgs[3]):  # m2 is the first not acked; m3 was acked out of order
            await m.ack_sync()
        assert await unsettled(js, STREAM, "consumer-test-unsettled", filtered) == [
            (f"consumer-test.x.{i}", f"m{i}".encode()) for i in (2, 3, 4, 5)]
        for m in (msgs[2], msgs[4], msgs[5]):
            await m.ack_sync()
        assert await unsettled(js, STREAM, "consumer-test-unsettled", filtered) == []
        await sub.unsubscribe()
