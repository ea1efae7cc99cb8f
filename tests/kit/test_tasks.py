"""Stopping background work: a task that loses a cancellation still ends, one that never ends does not hold
the shutdown for ever, and a service process whose shutdown is stuck ends itself."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from services.kit import runtime
from services.kit.runtime import Component, Registration, serve
from services.kit.tasks import cancel_and_wait
from tuneforge_core.settings import KitSettings


class Consumer(Component):
    """Consumes a queue as the NATS consumers do under nats-py: each wait is an `asyncio.wait_for`."""

    def __init__(self, queue: asyncio.Queue[str]) -> None:
        super().__init__(runtime=None)  # type: ignore[arg-type]
        self.queue = queue
        self.consumed: list[str] = []

    async def start(self) -> None:
        self.spawn(self.consume(), name="consumer")

    async def consume(self) -> None:
        while True:
            self.consumed.append(await asyncio.wait_for(self.queue.get(), 3600))


async def test_a_consumer_cancelled_as_a_message_arrives_still_stops() -> None:
    """On Python 3.11 `asyncio.wait_for` returns its future's result when that future completes in the turn
    of the cancel: the first cancellation is lost, and a stop that cancelled once waited for ever."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    consumer = Consumer(queue)
    await consumer.start()
    await asyncio.sleep(0)  # waiting on the queue
    queue.put_nowait("a message")
    stopping = asyncio.create_task(consumer.stop())  # cancels in the same turn as the message arrived
    # Not wait_for: its own cancel at the timeout would cancel the consumer a second time.
    done, _ = await asyncio.wait({stopping}, timeout=10)
    try:
        assert stopping in done and all(task.done() for task in consumer._tasks)
    finally:
        for task in [*consumer._tasks, stopping]:
            task.cancel()


async def test_a_task_that_never_ends_is_given_up_on_and_named(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="services.kit.tasks"):
        left = await asyncio.wait_for(cancel_and_wait([task], recancel_s=0.05, give_up_s=0.3), 10)
    assert left == {task} and not task.done()
    assert "still running" in caplog.text and "stubborn" in caplog.text
    release.set()
    await asyncio.wait_for(task, 10)


class StuckOnStop(Component):
    """A component whose stop never returns."""

    released = threading.Event()

    def registrations(self) -> Sequence[Registration]:
        return []

    async def stop(self) -> None:
        await asyncio.to_thread(self.released.wait)


async def test_a_service_process_whose_shutdown_is_stuck_ends_itself(
        kit_settings: KitSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    ended = threading.Event()
    calls: list[tuple[Any, ...]] = []

    def end_process(*args: Any) -> None:  # the real one ends the process: this one records and releases
        calls.append(args)
        ended.set()
        StuckOnStop.released.set()

    monkeypatch.setattr(runtime, "SHUTDOWN_BACKSTOP_S", 0.5)
    monkeypatch.setattr(runtime, "end_process", end_process)
    StuckOnStop.released.clear()
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve([StuckOnStop], kit_settings, name="stuck", on_ready=ready.set_result,
                                        stop=stop, end_stuck_shutdown=True))
    await asyncio.wait_for(asyncio.shield(ready), 60)
    stop.set()
    await asyncio.wait_for(serving, 30)
    assert ended.is_set()
    assert calls == [("stuck", kit_settings.shutdown_grace_s + 0.5)]
