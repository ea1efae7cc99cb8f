"""BoundedPool: its own threads, calls beyond its limits refused at once, places freed only when the thread
is done; and the database's calls on threads of their own, whatever holds the default executor."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from services.kit.db import Database
from services.kit.pools import BoundedPool
from tuneforge_core.errors import ResourceExhausted
from tuneforge_core.reasons import Reason

REQUEST = contextvars.ContextVar("REQUEST", default="")


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Held calls wait on it; always opened at the end, so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def held(gate: threading.Event, value: int = 0) -> int:
    assert gate.wait(10), "the gate was never opened"
    return value


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_calls_run_on_the_pools_own_threads_with_the_callers_context() -> None:
    pool = BoundedPool("test calls", 2, setting="TUNEFORGE_TEST_WORKERS")
    REQUEST.set("req-1")
    name, request = await pool.run(lambda: (threading.current_thread().name, REQUEST.get()))
    assert name.startswith("pool-test-calls") and request == "req-1"
    assert await pool.run(sum, [1, 2, 3]) == 6
    assert pool.admitted == 0
    pool.shutdown()


async def test_a_call_beyond_workers_and_pending_is_refused_at_once(gate: threading.Event) -> None:
    pool = BoundedPool("test imports", 1, 1, setting="TUNEFORGE_TEST_WORKERS")
    running = [asyncio.ensure_future(pool.run(held, gate, k)) for k in range(2)]  # one runs, one waits
    await until(lambda: pool.admitted == 2)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as caught:
        await pool.run(held, gate)
    assert time.monotonic() - started < 0.5
    err = caught.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == Reason.QUOTA_EXCEEDED
    assert err.metadata == {"limit": "test_workers", "value": "1", "pool": "test imports"}
    assert "(TUNEFORGE_TEST_WORKERS=1)" in err.message
    with pytest.raises(ResourceExhausted):
        pool.reserve()
    gate.set()
    assert await asyncio.gather(*running) == [0, 1]
    await until(lambda: pool.admitted == 0)
    assert await pool.run(held, gate, 7) == 7  # room again
    pool.shutdown()


async def test_a_cancelled_caller_frees_its_place_only_when_the_thread_is_done(gate: threading.Event) -> None:
    pool = BoundedPool("test cancel", 1, 0)
    call = asyncio.ensure_future(pool.run(held, gate))
    await until(lambda: pool.admitted == 1)
    await asyncio.sleep(0.05)  # the thread has started
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    with pytest.raises(ResourceExhausted):  # the thread still runs, so its place is still taken
        await pool.run(held, gate)
    gate.set()
    await until(lambda: pool.admitted == 0)
    assert await pool.run(held, gate, 3) == 3
    pool.shutdown()


async def test_a_slot_admits_work_of_several_calls_once(gate: threading.Event) -> None:
    pool = BoundedPool("test slots", 1, 0, setting="TUNEFORGE_TEST_WORKERS")
    with pool.reserve() as slot:
        assert pool.admitted == 1
        with pytest.raises(ResourceExhausted):
            await pool.run(int)
        assert await slot.run(int, "4") == 4
        assert await slot.run(int, "5") == 5  # never refused: the place is the slot's
    assert pool.admitted == 0 and not slot.held
    slot.release()  # a second release does nothing
    assert pool.admitted == 0
    with pytest.raises(RuntimeError):
        await slot.run(int)
    pool.shutdown()


async def test_work_accepted_before_waits_for_a_place_instead_of_being_refused() -> None:
    pool = BoundedPool("test waiting", 1, 0)
    first = pool.reserve()
    waiting = asyncio.ensure_future(pool.reserve_waiting())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.release()
    second = await asyncio.wait_for(waiting, 2)
    assert pool.admitted == 1
    second.release()
    assert pool.admitted == 0


async def test_a_pool_without_pending_limit_queues(gate: threading.Event) -> None:
    pool = BoundedPool("test queue", 1, None)
    calls = [asyncio.ensure_future(pool.run(held, gate, k)) for k in range(5)]
    await until(lambda: pool.admitted == 5)
    gate.set()
    assert await asyncio.gather(*calls) == [0, 1, 2, 3, 4]
    pool.shutdown()


def test_limits_must_make_sense() -> None:
    with pytest.raises(ValueError):
        BoundedPool("bad", 0)
    with pytest.raises(ValueError):
        BoundedPool("bad", 1, -1)


async def test_database_calls_answer_while_the_default_executor_is_stuck(
        tmp_path: Path, gate: threading.Event) -> None:
    """What used to stall every service: the loop's default executor full of calls that never return."""
    db = Database(f"sqlite:///{tmp_path / 'pools.db'}", "pools", workers=2)
    loop = asyncio.get_running_loop()
    stuck_executor = ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(stuck_executor)
    stuck = [asyncio.ensure_future(asyncio.to_thread(held, gate)) for _ in range(4)]
    try:
        async with asyncio.timeout(1):
            results = await asyncio.gather(*(db.run(lambda s: s.execute(text("SELECT 1")).scalar())
                                             for _ in range(10)))
        assert results == [1] * 10
        assert threading.current_thread().name == "MainThread"
        names = await asyncio.gather(*(db.run(lambda s: threading.current_thread().name) for _ in range(3)))
        assert all(n.startswith("pool-pools-database-calls") for n in names)
    finally:
        gate.set()
        await asyncio.gather(*stuck)
        db.dispose()
    # A disposed database starts new threads when used again.
    assert await db.run(lambda s: s.execute(text("SELECT 2")).scalar()) == 2
    db.dispose()
