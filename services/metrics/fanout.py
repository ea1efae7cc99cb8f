"""Live fan-out: what many followers of one job share in a process.

Per followed job and live subject there is ONE subscription (`_Topic`), whoever follows: each message is
decoded once, each item serialized once, and the same `LiveItem` (hence the same bytes) goes to every
follower whose filters it matches. Per followed job there is one `JobWatch`: its JobChanged subscription
and one poll of the jobs service per interval say when the job ended, for all its followers. Both are
reference-counted and unsubscribed when the last follower leaves.

A follower holds at most `capacity` items. One that falls further behind (its client reads more slowly
than the job reports) never slows the hub or the others: its buffer is dropped, it is marked `lagged`, and
remembers the lowest cursor it dropped. Its stream then replays from the database from there (every item
announced was committed first) and takes the live feed again, exactly: see `MetricsManager._stream`.

Early delivery (`EarlyFeed`): a topic also hears the job's reports as workers publish them (the subject the
ingest consumes from JetStream: core NATS delivers each publish to plain subscribers too), and hands their
items to its followers then, instead of after the ingest fetched, wrote and announced them (one follower
of a job got its points in half the time: benchmarks/README.md). The stored announcement still comes, and
stays the truth for whoever was not following early:
- A follower starts on the stored feed only (what its replay of the database and the announcements cover
  exactly). Each item handed out early waits in `_Topic.pending` until its announcement comes (`_settle`).
- When an announcement settles an early item, every stored-only follower is offered the items still
  pending, in order, and takes the early feed from then on (`_promote`). Reports of a job are stored in the
  order they were published (one consumer, batches written in order), so by then the follower has every
  item published before the pending ones; whatever was published before the early subscription was made is
  stored before any early item is, hence before anyone is promoted.
- An announced item that was handed out early goes to the stored-only followers alone; one that was not
  (its report came before the early subscription, or was stored by other means) goes to all.
- A follower that fell behind drops back to the stored feed (`rejoin`) and catches up from storage.
- An early item whose announcement never comes (its report was refused by JetStream, or its job deleted)
  is forgotten after EARLY_TTL_S; if it is announced after all, the streams' own dedupe drops the repeat.
Each stream's dedupe (`fresh`, per series) drops an item it was offered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.metrics.live import Deliver, LiveMessage
from tuneforge_core import states, subjects
from tuneforge_core.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Cursor = tuple[int, int]
# What a feed reads of each item to filter, dedupe and place it, as plain ints (a point's (step, kind), a
# log entry's (attempt, sequence, level, source)): made once per item, whatever the followers.
Key = tuple[int, ...]


# How long an item handed out early waits for its announcement after the commit (see the module doc), and
# how many such items a topic keeps at most (the oldest go first): a follower promoted to the early feed
# is offered those still waiting.
EARLY_TTL_S = 60.0
EARLY_MAX_PENDING = 10_000


class Subscriber(Protocol):
    def subscribe(self, subjects: Sequence[str]) -> AbstractAsyncContextManager[asyncio.Queue[LiveMessage]]:
        """Queues every message on `subjects` once the server has confirmed the interest."""

    def listen(self, subjects: Sequence[str], deliver: Deliver) -> AbstractAsyncContextManager[None]:
        """Hands every message on `subjects` to `deliver` once the server has confirmed the interest (this
        process' own announcements from within their publish)."""


@dataclass(frozen=True, slots=True)
class LiveItem(Generic[T]):
    """One point or log entry with its bytes, made once and shared by every stream it goes to.

    `framed` is the wire form of a message holding only the item in its field 1, which is exactly
    StreamMetricsResponse{point} or StreamLogsResponse{entry}: a stream writes these bytes as they are.
    `repeated` is the same in field 2 (`points` / `entries`): a batched message is such fields one after
    the other, since protobuf parses concatenated messages as one and appends to repeated fields.
    """

    item: T
    framed: bytes
    repeated: bytes
    # The plain ints that filters, dedupe and cursors read (see `Key`), read off the item once for every
    # follower. Read from the message per follower, the filter alone took 8.5% of the event loop's samples
    # (py-spy) in a fan-out of one job to 1,000 streams.
    key: Key


@dataclass(frozen=True, slots=True)
class EarlyFeed(Generic[T]):
    """Where a followed job's items are reported before they are stored (a worker's MetricsReported or
    LogsReported subject), and its reports read as the items the ingest would store of them: none for a
    report it would refuse, the same items otherwise (see the module doc)."""

    subject: str
    decode: Callable[[str, bytes], Sequence[T]]


class _Early:
    """An item handed out early, until its announcement after the commit settles it."""

    __slots__ = ("deadline", "key", "live", "settled")

    def __init__(self, key: Key, live: LiveItem[Any], deadline: float) -> None:
        self.key = key
        self.live = live
        self.deadline = deadline
        self.settled = False


class Chunk(NamedTuple, Generic[T]):
    """What a stream sends next: items in order, and whether they are the first after catching up from
    storage (the stream had fallen too far behind the live feed). A tuple: one is made per point per
    follower."""

    items: list[LiveItem[T]]
    resumed: bool = False


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


FIELD_1, FIELD_2 = b"\x0a", b"\x12"  # fields 1 and 2, length-delimited


def live_item(item: M, key: Key) -> LiveItem[M]:
    """`item` serialized once, framed as field 1 and as field 2, with its `key` (see LiveItem)."""
    data = item.SerializeToString()
    size = varint(len(data))
    return LiveItem(item, FIELD_1 + size + data, FIELD_2 + size + data, key)


def end_deadline(job: job_pb2.Job, now: float, grace_s: float) -> float:
    """When streams of a job already final end: at once if it ended longer ago than the grace."""
    if job.HasField("end_time") and time.time() - job.end_time.ToSeconds() > grace_s:
        return now
    return now + grace_s


class Follower(Generic[T]):
    """One stream's bounded buffer of live items; filled by the hub, drained by the stream.

    The stream waits on `wait()` (one future at a time, cheaper than an Event: this runs once per point per
    follower); `wake()` ends that wait, from the hub, the job watch or a timer."""

    __slots__ = ("_waiter", "buffer", "capacity", "cursor", "dropped_from", "early", "error", "lagged",
                 "matches")

    def __init__(self, matches: Callable[[Key], bool], cursor: Callable[[Key], Cursor],
                 capacity: int) -> None:
        self.matches = matches
        self.cursor = cursor
        self.capacity = capacity
        self.buffer: deque[LiveItem[T]] = deque()
        self.lagged = False
        # The lowest cursor of what was dropped while lagged: the replay that catches up starts there.
        self.dropped_from: Cursor | None = None
        # Set when the shared subscription failed: the stream ends with it.
        self.error: BaseException | None = None
        # Whether it takes the items of reports as they are published (see the module doc), or only
        # once they are stored.
        self.early = False
        self._waiter: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """Done at the next `wake()`. A wake while nobody waits is lost: the stream checks what a wake stands
        for (its buffer, lagging, an error, the job's end) right before it waits, with no await between."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def offer(self, live: LiveItem[T]) -> None:
        if not self.matches(live.key):
            return
        if not self.lagged and len(self.buffer) < self.capacity:
            self.buffer.append(live)
            self.wake()
            return
        dropped = [live, *self.buffer] if not self.lagged else [live]
        self.buffer.clear()
        self.lagged = True
        low = min(self.cursor(d.key) for d in dropped)
        if self.dropped_from is None or low < self.dropped_from:
            self.dropped_from = low
        self.wake()

    def take(self) -> list[LiveItem[T]]:
        items = list(self.buffer)
        self.buffer.clear()
        return items

    def rejoin(self) -> Cursor | None:
        """Takes live items again from now on, stored ones only until promoted again (what it dropped may
        not be stored yet: the replay would miss it); returns where the replay that catches up starts."""
        low, self.dropped_from, self.lagged, self.early = self.dropped_from, None, False, False
        return low


class _Topic:
    """One live subject's subscription, shared by its followers, and its early feed's (see the module doc)."""

    def __init__(self, subject: str, decode: Callable[[bytes], Sequence[Any]],
                 key: Callable[[Any], Key], early: EarlyFeed[Any] | None = None) -> None:
        self.subject = subject
        self.decode = decode
        self.key = key
        self.early = early
        # Items handed out early, in the order they were, until settled or forgotten; and how many of
        # them wait per key.
        self.pending: deque[_Early] = deque()
        self.pending_keys: dict[Key, int] = {}
        # In the order they joined (a dict, not a set): each point is handed to the followers, and their
        # streams write it, in that order. Against a set's order (by address), measured side by side in
        # alternating runs (benchmarks/README.md, run I), 1 job x 1,000 followers on SQLite: p50 53 -> 45 ms,
        # p99 136 -> 100 ms (medians of 3), the CPU per delivery unchanged.
        self.followers: dict[Follower[Any], None] = {}
        self.refs = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def run(self, live: Subscriber) -> None:
        try:
            # Dispatched as delivered: an announcement of this process reaches the followers' buffers
            # within its publish, not one turn of a busy event loop later.
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(
                    live.listen([self.subject], lambda _subject, data: self.dispatch(data)))
                if self.early is not None:
                    await stack.enter_async_context(live.listen([self.early.subject], self.dispatch_early))
                self.ready.set_result(None)
                await asyncio.Event().wait()  # until the last follower leaves (cancelled)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the live feed of %s failed", self.subject)
            self.error = Unavailable(f"the live feed of {self.subject} failed")
            if not self.ready.done():
                self.ready.set_exception(self.error)
                self.ready.exception()  # retrieved: whoever waits gets it, nobody need
            for follower in self.followers:
                follower.error = self.error
                follower.wake()

    def dispatch(self, data: bytes) -> None:
        """An announcement of stored items (see the module doc for who is offered what)."""
        try:
            items = self.decode(data)
        except DecodeError:
            log.warning("ignoring an undecodable message on %s", self.subject)
            return
        followers, key = self.followers, self.key
        if not self.pending:
            for item in items:
                shared = live_item(item, key(item))
                for follower in followers:
                    follower.offer(shared)
            return
        self._forget(time.monotonic())
        stored_only = [follower for follower in followers if not follower.early]
        settled = False
        for item in items:
            k = key(item)
            if self._settle(k):
                settled = True
                if stored_only:
                    shared = live_item(item, k)
                    for follower in stored_only:
                        follower.offer(shared)
                continue
            shared = live_item(item, k)
            for follower in followers:
                follower.offer(shared)
        if settled and stored_only:
            self._promote(stored_only)

    def dispatch_early(self, subject: str, data: bytes) -> None:
        """A report as its worker published it: its items to the followers on the early feed, and kept
        until their announcement (see the module doc)."""
        assert self.early is not None
        try:
            items = self.early.decode(subject, data)
        except InvalidArgument as exc:  # the ingest refuses it too, and says so
            log.debug("not handing out a report on %s early: %s", subject, exc.message)
            return
        except Exception:
            log.exception("could not read a report on %s early; its items come once stored", subject)
            return
        if not items:
            return
        now = time.monotonic()
        self._forget(now)
        early = [follower for follower in self.followers if follower.early]
        key, pending, counts = self.key, self.pending, self.pending_keys
        for item in items:
            k = key(item)
            shared = live_item(item, k)
            pending.append(_Early(k, shared, now + EARLY_TTL_S))
            counts[k] = counts.get(k, 0) + 1
            for follower in early:
                follower.offer(shared)
        self._forget(now)

    def _settle(self, key: Key) -> bool:
        """Whether an announced item with `key` was handed out early (it is then no longer pending)."""
        counts = self.pending_keys
        left = counts.get(key)
        if not left:
            return False
        if left == 1:
            del counts[key]
        else:
            counts[key] = left - 1
        pending = self.pending
        for waiting in pending:  # announced in the order handed out: the first, unless a report was refused
            if not waiting.settled and waiting.key == key:
                waiting.settled = True
                break
        while pending and pending[0].settled:
            pending.popleft()
        return True

    def _forget(self, now: float) -> None:
        """Drops early items past EARLY_TTL_S, and the oldest past EARLY_MAX_PENDING."""
        pending, counts = self.pending, self.pending_keys
        while pending and (pending[0].deadline <= now or len(pending) > EARLY_MAX_PENDING):
            waiting = pending.popleft()
            if not waiting.settled:
                left = counts[waiting.key] - 1
                if left:
                    counts[waiting.key] = left
                else:
                    del counts[waiting.key]

    def _promote(self, stored_only: list[Follower[Any]]) -> None:
        """Moves stored-only followers to the early feed, each first offered what is still pending."""
        waiting = [p.live for p in self.pending if not p.settled]
        for follower in stored_only:
            if follower.lagged:
                continue  # it catches up from storage first (`rejoin`)
            for shared in waiting:
                follower.offer(shared)
            if not follower.lagged:
                follower.early = True


class JobWatch:
    """When a followed job ended, learned once for all its followers in the process.

    `deadline` is the loop time at which its streams end (None while it runs): the grace after the final
    state was seen (from JobChanged, or a poll of the jobs service in case a JobChanged was lost), or at
    once for a job that ended longer ago than the grace. `error` is set when the job can no longer be
    followed (e.g. it was deleted), and streams end with it.
    """

    def __init__(self, organization: str, job_id: str) -> None:
        self.job_id = job_id
        self.organization = organization
        self.deadline: float | None = None
        self.error: BaseException | None = None
        self.followers: set[Follower[Any]] = set()
        self.refs = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def _end(self, deadline: float) -> None:
        if self.deadline is not None:
            return
        self.deadline = deadline
        loop = asyncio.get_running_loop()
        self._wake_all()
        loop.call_at(deadline, self._wake_all)

    def _wake_all(self) -> None:
        for follower in self.followers:
            follower.wake()

    async def run(self, live: Subscriber, lookup: Callable[[str, str], Awaitable[job_pb2.Job]],
                  grace_s: float, poll_interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        events_subject = subjects.job_events(self.job_id)
        try:
            async with live.subscribe([events_subject]) as queue:
                # The job may have ended before the subscription: one lookup, for everyone following it.
                job = await self._poll(lookup)
                if job is not None and states.is_final(job.state):
                    self._end(end_deadline(job, loop.time(), grace_s))
                self.ready.set_result(None)
                next_poll = loop.time() + poll_interval_s
                while self.deadline is None:
                    try:
                        _, data = await asyncio.wait_for(queue.get(),
                                                         timeout=max(next_poll - loop.time(), 0.001))
                    except TimeoutError:
                        next_poll = loop.time() + poll_interval_s
                        job = await self._poll(lookup)
                        if job is not None and states.is_final(job.state):
                            self._end(loop.time() + grace_s)
                        continue
                    try:
                        changed = events_pb2.JobChanged.FromString(data)
                    except DecodeError:
                        log.warning("ignoring an undecodable message on %s", events_subject)
                        continue
                    if states.is_final(changed.job.state):
                        self._end(loop.time() + grace_s)
                # Ended: nothing more to learn; hold the subscription until the last follower leaves.
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            if not self.ready.done():
                self.ready.set_exception(exc)
                self.ready.exception()
            self._wake_all()

    async def _poll(self, lookup: Callable[[str, str], Awaitable[job_pb2.Job]]) -> job_pb2.Job | None:
        try:
            return await lookup(self.organization, self.job_id)
        except Unavailable:
            log.warning("jobs service unavailable while following job %s; still following", self.job_id)
            return None


class FanoutHub:
    """The per-process registry of shared subscriptions and job watches."""

    def __init__(self, live: Subscriber, lookup: Callable[[str, str], Awaitable[job_pb2.Job]], *,
                 grace_s: float, poll_interval_s: float, capacity: int) -> None:
        self.live = live
        self.lookup = lookup
        self.grace_s = grace_s
        self.poll_interval_s = poll_interval_s
        self.capacity = capacity
        self.topics: dict[str, _Topic] = {}
        self.watches: dict[str, JobWatch] = {}

    @contextlib.asynccontextmanager
    async def follow(self, organization: str, job_id: str, subject: str,
                     decode: Callable[[bytes], Sequence[T]], key: Callable[[T], Key],
                     matches: Callable[[Key], bool], cursor: Callable[[Key], Cursor],
                     early: EarlyFeed[T] | None = None) -> AsyncIterator[tuple[Follower[T], JobWatch]]:
        """Joins the live feed on `subject` (and `early`, see the module doc) and the watch of `job`; the
        block starts once all are subscribed, so anything committed after that reaches the follower.
        `decode`, `key` and `early` are the same for every follower of a subject (its first one's are
        used); `matches` and `cursor` read the key."""
        follower: Follower[T] = Follower(matches, cursor, self.capacity)
        topic = self.topics.get(subject)
        if topic is None or topic.error is not None:
            topic = self.topics[subject] = _Topic(subject, decode, key, early)
            topic.task = asyncio.create_task(topic.run(self.live), name=f"live {subject}")
        watch = self.watches.get(job_id)
        if watch is None or watch.error is not None:
            watch = self.watches[job_id] = JobWatch(organization, job_id)
            watch.task = asyncio.create_task(
                watch.run(self.live, self.lookup, self.grace_s, self.poll_interval_s), name=f"watch {job_id}")
        topic.refs += 1
        watch.refs += 1
        topic.followers[follower] = None
        watch.followers.add(follower)
        try:
            # Shielded: a follower that gives up while waiting must not cancel what others wait for.
            await asyncio.shield(topic.ready)
            await asyncio.shield(watch.ready)
            yield follower, watch
        finally:
            topic.followers.pop(follower, None)
            watch.followers.discard(follower)
            topic.refs -= 1
            watch.refs -= 1
            done: list[asyncio.Task[None]] = []
            if topic.refs == 0:
                if self.topics.get(subject) is topic:
                    del self.topics[subject]
                if topic.task is not None:
                    topic.task.cancel()
                    done.append(topic.task)
            if watch.refs == 0:
                if self.watches.get(job_id) is watch:
                    del self.watches[job_id]
                if watch.task is not None:
                    watch.task.cancel()
                    done.append(watch.task)
            if done:
                # Unsubscribed when the stream's end is reported, not some time later.
                await asyncio.wait(done)

    def subscriptions(self) -> int:
        """How many shared subscriptions are open (live subjects and job watches)."""
        return len(self.topics) + len(self.watches)
