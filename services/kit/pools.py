"""Bounded thread pools: blocking work that cannot starve other work, and is refused rather than queued
without end.

`asyncio.to_thread` runs everything on the event loop's default executor, which every service of the
process shares: a few calls stuck on a source that never answers hold its threads, and every other
service's database work waits behind them. A `BoundedPool` is a pool of threads of its own for one kind of
work, with two limits:

- at most `max_workers` calls run at once (the pool's own threads);
- at most `max_pending` more are admitted to wait for a thread. A call beyond `max_workers + max_pending`
  is refused at once with RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED; the message names the setting that
  sizes the pool, the metadata its field name and value), never queued. `max_pending=None` queues without
  limit: only for work no caller can make slow (the database's, the service's own object store).

Work made of several blocking calls (an import: check, fetch, process) is admitted once, up front, with
`reserve()`: the `Slot` counts as one admitted call until it is released, and its calls run on the pool's
threads without being admitted again, so work once accepted is never refused half-way.

A place is given back when the thread is done, not when the caller stops waiting: a cancelled caller does
not free a thread that still runs, so the limits hold for threads too. Threads cannot be stopped; what
keeps a call from running for ever is the timeouts of the work itself (a network read's, say).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import ParamSpec, TypeVar

from tuneforge_core.errors import ResourceExhausted
from tuneforge_core.reasons import Reason

T = TypeVar("T")
P = ParamSpec("P")


class BoundedPool:
    """`max_workers` threads named after `name`; see the module for the limits. `setting` is the
    environment variable that sizes the pool (TUNEFORGE_...), named to the caller it refuses."""

    def __init__(self, name: str, max_workers: int, max_pending: int | None = 0, *,
                 setting: str = "") -> None:
        if max_workers < 1 or (max_pending is not None and max_pending < 0):
            raise ValueError(f"pool {name}: max_workers must be at least 1 and max_pending not negative")
        self.name = name
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.setting = setting
        self._lock = threading.Lock()
        self._admitted = 0
        self._executor: ThreadPoolExecutor | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def capacity(self) -> int | None:
        """How many calls (and slots) may be admitted at once; None: no limit."""
        return None if self.max_pending is None else self.max_workers + self.max_pending

    @property
    def admitted(self) -> int:
        """Calls and slots admitted now (running, waiting for a thread, or held)."""
        return self._admitted

    def exhausted(self) -> ResourceExhausted:
        """The error of a call refused because the pool is full: metadata "limit" is the setting's field
        name (import_workers), "value" its value, as the kit's other limits say it."""
        setting = f"{self.setting}={self.max_workers}" if self.setting else f"{self.max_workers} threads"
        return ResourceExhausted(
            f"The server is already running as many {self.name} as it allows at once ({setting}); retry "
            "later.",
            reason=Reason.QUOTA_EXCEEDED,
            metadata={"limit": self.setting.removeprefix("TUNEFORGE_").lower(),
                      "value": str(self.max_workers), "pool": self.name})

    def _admit(self) -> bool:
        with self._lock:
            capacity = self.capacity
            if capacity is not None and self._admitted >= capacity:
                return False
            self._admitted += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
            waiters, self._waiters = self._waiters, []
        # Every waiter looks again (a woken waiter that was cancelled meanwhile then loses no wake-up).
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                prefix = "pool-" + "-".join(self.name.split())
                self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=prefix)
            return self._executor

    async def _call(self, release: bool, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs `fn` on a thread of the pool (in the caller's context variables); with `release`, the
        admitted place is given back when the thread is done with it, whatever the caller does."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            future: Future[T] = self._pool().submit(call)
        except BaseException:
            if release:
                self._release()
            raise
        if release:
            future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a thread of the pool; RESOURCE_EXHAUSTED at once when the pool is full."""
        if not self._admit():
            raise self.exhausted()
        return await self._call(True, fn, *args, **kwargs)

    def reserve(self) -> Slot:
        """A place for work made of several calls; RESOURCE_EXHAUSTED at once when the pool is full."""
        if not self._admit():
            raise self.exhausted()
        return Slot(self)

    async def reserve_waiting(self) -> Slot:
        """A place for work that was accepted before (an import resumed at start): waits for one rather
        than being refused."""
        loop = asyncio.get_running_loop()
        while not self._admit():
            waiter: asyncio.Future[None] = loop.create_future()
            with self._lock:
                self._waiters.append((loop, waiter))
            if self._admit():  # a place was freed before the waiter was seen
                return Slot(self)
            await waiter
        return Slot(self)

    def shutdown(self) -> None:
        """Lets the pool's threads end once their calls are done (without waiting); a later call starts
        new ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Slot:
    """One admitted place in a pool, held until `release()` (or the end of a `with` block). Release it
    only once its calls are done: the place stands for the thread they use."""

    def __init__(self, pool: BoundedPool) -> None:
        self.pool = pool
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a thread of the pool, within this slot (never refused)."""
        if not self._held:
            raise RuntimeError(f"a released slot of pool {self.pool.name} was used")
        return await self.pool._call(False, fn, *args, **kwargs)

    def release(self) -> None:
        """Gives the place back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self.pool._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


__all__ = ["BoundedPool", "Slot"]
